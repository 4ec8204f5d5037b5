"""The bridge to the building's MQTT broker: state, events, discovery, signed commands.

Modules: ``topics`` (every topic string), ``backoff`` (the reconnect policy), ``link``
(connection states, TLS, credentials), ``discovery`` (Home Assistant), ``cursor`` (the
persisted position in the event log), ``bridge`` (the station component), ``url``.
"""
