"""Chimera composition root: settings and the command line that wire the packages together.

The generated gRPC stubs live in ``chimera.v1`` because protoc emits imports by proto path
(``from chimera.v1 import prediction_pb2``); keeping the package path equal to the proto path
makes them importable without sys.path tricks.
"""
