"""rmidl.server: the name server (RMI registry) and ConvolutionWorker daemons (the skeleton side), as
libraries: start one, serve it. Their commands (`rmidl ns`, `rmidl worker`) live in rmidl.client.cli."""
