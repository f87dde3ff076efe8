"""What runs models: checkpoints, devices, command-line plumbing, submissions, segment scoring."""
