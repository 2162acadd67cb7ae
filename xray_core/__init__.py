"""The layer both sides of the project stand on: `data_tools` (which writes shards) and
`xray_pretrain` (which reads them, trains and predicts) import from here, never the other way.

- `shardio`: the on-disk shard format (tars, DALI idx files, manifest names, sample keys);
- `images`, `dicom`, `load`: any input file -> one grayscale image with air dark, one intensity policy;
- `roi`: the chest-region estimate (box + small mask) that context-aware masking uses.

Nothing here imports torch, DeepSpeed, `data_tools` or `xray_pretrain`.
"""
