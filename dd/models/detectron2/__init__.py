"""detectron2 Mask R-CNN models, served as detectron2 serves them.

A detectron2 model folder (its YAML and checkpoint) is read into torchvision's
Mask R-CNN module tree, so that every engine can run it, with small modules
where detectron2's inference rules differ from torchvision's. One job per module:

- config.py: the YAML read as detectron2 reads it (``_BASE_``, defaults), validated
  into a Detectron2Spec; what is not supported is refused with the key named.
  Pure Python: the supervisor and frontends use it without torch.
- checkpoint.py: the weights read safely, their format recognised by their keys.
- convert.py: detectron2 parameter names and layouts to torchvision's.
- network.py: the torchvision-structured network for a spec, with detectron2's rules.
- loader.py: a model folder's config to a loaded, ready network.
- preprocess.py / postprocess.py: detectron2's DefaultPredictor around the network
  (resize, normalise, pad; rescale, clip, mask paste).

Nothing here imports detectron2.
"""
