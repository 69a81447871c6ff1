"""Pull-consumer workers: the runtime and the engines."""
