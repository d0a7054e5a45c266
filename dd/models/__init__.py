"""Network architectures, shared by the engines and the training scripts (no serving code here)."""

from dd import lazy_dynamo

lazy_dynamo.install()  # before any network module imports torchvision (see there)
