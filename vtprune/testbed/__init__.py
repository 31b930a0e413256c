"""The synthetic VQA testbed that sweeps load as tasks (``testbed: llava | qwen2_vl``): seeded scenes and questions
(:mod:`.scenes`, :mod:`.questions`), evaluation sets and their stored held-out file (:mod:`.dataset`,
``heldout.json.gz``), the testbed VLM definition (:mod:`.model`) and the export of the held-out set as task folders
with informed token priorities (:mod:`.export`).

Training and the accuracy report stay with the repository (``eval/testbed/train.py``, ``eval/testbed/evaluate.py``),
next to the checkpoints they write (``eval/testbed/checkpoints``).
"""
