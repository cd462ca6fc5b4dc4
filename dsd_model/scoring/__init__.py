"""How well an output keeps the reference's subject, for the service and `dsd eval`:

    faces.py      dlib's packaged face detector and ResNet descriptor (the `[faces]` extra)
    subjects.py   DINOv2 / CLIP-I similarity from local weights, or the tiny profile's random encoder
    identity.py   `IdentityScore` and the scorer that picks between them
"""
