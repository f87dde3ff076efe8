"""Apache Beam jobs: ``python -m beam_jobs.preprocess`` (TFRecords -> whitened Parquet shards) and friends."""
