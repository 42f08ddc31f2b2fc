"""The USB rule model, the leaf that usbgate and the keystore both import: the rules, their
grammar and decision, and QEMU's filters from them (docs/architecture.md).
"""
