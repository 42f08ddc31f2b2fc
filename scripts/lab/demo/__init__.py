"""The end-to-end demo (``scripts/demo``): the walkthrough reads as the story
(walkthrough.py); support.py is its machinery, usb_guest.py and libvirt.py two of its steps."""
