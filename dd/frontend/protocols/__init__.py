"""One adapter per public protocol: it turns the protocol's messages into the frontend's
protocol-free calls and its errors (dd.frontend.errors.Status) into the protocol's codes."""
