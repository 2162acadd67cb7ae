"""Version of the `xray-shard` tool, written into every manifest.

Bump the minor number when the bytes written for the same inputs and options change (a different
encoder setting, a new json field), so manifests say which shards can be compared byte for byte.
"""

TOOL_NAME = "xray-shard"
TOOL_VERSION = "1.0.0"
