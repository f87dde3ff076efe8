"""Network parts: video and image backbones, the CMA head both branches share, ASGE, losses, whole models."""
