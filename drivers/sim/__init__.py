"""Simulated turnstile I/O board: a real pymodbus server for tests and the demo.

``board`` holds the board's state and behaviour, ``server`` serves it over Modbus TCP and RTU,
``control`` and ``client`` are the JSON-lines control channel, ``__main__`` is ``gate-sim``.
"""
