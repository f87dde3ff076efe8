"""Data loading: Parquet video shards, COCO-format images."""
