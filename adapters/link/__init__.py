"""The link: a connector's encrypted, outbound, two-way connection to the hub (docs/link.md).

On the plant's premises a connector (`policyd-connector`, connector.py) dials out to the
hub's link listener (`LinkHub`, hub.py, an ASGI app) over Socket.IO: WebSocket, or HTTP
long-polling where WebSocket is blocked. The hub sends each app's already-authorized data
request down the link of the connector that serves its data source and gets the answer
back. policyd authorizes the connector when it attaches, before every request and every
`recheck_seconds` while the link lives (authorize.py).
"""

from adapters.link.authorize import Authorizer, GrpcAuthorizer, Verdict
from adapters.link.hub import LinkError, LinkHub, LinkTimeout, LinkUnavailable
from adapters.link.wire import LinkResponse

__all__ = [
    "Authorizer",
    "GrpcAuthorizer",
    "LinkError",
    "LinkHub",
    "LinkResponse",
    "LinkTimeout",
    "LinkUnavailable",
    "Verdict",
]
