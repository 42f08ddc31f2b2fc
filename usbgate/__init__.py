"""usbgate: a usbredir gateway that forwards only whitelisted USB devices to a VM.

Its packages, modules and layers: docs/architecture.md ("Package map", "The dependency rule").
"""
