"""The states of a relay (`relay.Relay.state`; the diagram is in relay.py's docstring)."""

PREAMBLE = 'preamble'                  # reading a PROXY header or a ClientHello (preamble.py)
CONNECTING = 'connecting'              # connecting to a server, trying the next on failure
WAITING_FOR_FILES = 'waiting for files'   # EMFILE for the upstream socket: retrying soon
RELAYING = 'relaying'                  # both connected, bytes both ways
HALF_CLOSED = 'half-closed'            # one side's FIN passed on; the other direction goes on
FINISHING = 'finishing'                # the drain deadline: FIN both ways, input dropped
CLOSED = 'closed'                      # both sockets closed or closing
