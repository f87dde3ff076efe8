"""YouTube-8M data plumbing without Beam or torch: record codec, TFRecord framing, synthetic data, shards."""
