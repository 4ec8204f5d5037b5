"""The door's hardware: buttons, lock relay, door contact, tamper switch, camera, audio.

Everything GPIO goes through gpiozero, so the same code runs on a Raspberry Pi (the
lgpio backend) and in a simulated station (gpiozero's own ``MockFactory``).
"""
