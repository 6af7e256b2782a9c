"""Test support code: emulators (kinesalite, moto's server), a fault-injecting Kinesis proxy and a
reference Kinesis reader. Nothing here imports ``treasure_engine``."""
