"""Metrics: YouTube-8M video and segment metrics, image multi-label metrics, attention statistics."""
