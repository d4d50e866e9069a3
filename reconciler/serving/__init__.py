"""Serving: the chat jobs the network routes to this node, run on the backend that holds each
model, with events and one ``complete`` per job (``runner``)."""
