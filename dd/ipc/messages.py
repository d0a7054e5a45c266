"""Control messages between frontends and workers, framed for ZeroMQ.

Each ZeroMQ message is a kind byte followed by a protobuf (never pickle):
  I  InferRequest            frontend -> worker
  R  InferReply [+ response] worker -> frontend; on OK a second frame holds the
                             serialized DetectResponse, handed to gRPC untouched.
                             Sent by the worker's inference thread to the frontend's
                             reply socket (Ping.reply_to) after a frame with the worker's
                             name, or through the worker's ROUTER until that is connected
  P  Ping                    frontend -> worker
  O  Pong                    worker -> frontend
"""

from __future__ import annotations

from dd.proto.deep_detection.ipc.v1 import ipc_pb2

INFER = b"I"
REPLY = b"R"
PING = b"P"
PONG = b"O"

InferRequest = ipc_pb2.InferRequest
InferReply = ipc_pb2.InferReply
Ping = ipc_pb2.Ping
Pong = ipc_pb2.Pong
ArrayRef = ipc_pb2.ArrayRef
OutputRegion = ipc_pb2.OutputRegion
