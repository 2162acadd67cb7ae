"""Report generation parts that need no engine: tokenizer, metrics, study grouping.

How they plug into the Task protocol and the batch contract: docs/report_generation.md.
"""
