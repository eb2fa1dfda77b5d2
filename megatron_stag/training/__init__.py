"""Training-time pieces: gradient hooks and the CPU demo loop."""
