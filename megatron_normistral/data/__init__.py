"""Data pipeline: indexed .bin/.idx format (``indexed``), JSONL preprocessing (``preprocess``),
mixture planning and the upsampled mixture dataset (``mixture``). Submodules are imported on
use; this package stays import-light."""
