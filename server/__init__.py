"""rmidl.server: the name server (RMI registry) and ConvolutionWorker daemons (the skeleton side)."""
