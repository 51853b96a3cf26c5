"""Cloud sync over MQTT: the topic contract, signed downlink, durable uplink (docs/mqtt.md)."""
