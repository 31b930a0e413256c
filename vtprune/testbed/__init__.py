"""The synthetic VQA testbed that sweeps load as tasks (``testbed: llava | qwen2_vl``): seeded scenes and questions
(:mod:`.scenes`, :mod:`.questions`), evaluation sets and their stored held-out file (:mod:`.dataset`,
``heldout.json.gz``), the testbed VLM definition (:mod:`.model`) and the export of the held-out set as task folders
with informed token priorities (:mod:`.export`); short videos with questions whose answers need time, their stored
held-out file and informed references for the video testbed (:mod:`.video`, ``video_heldout.json.gz``).

Training and the accuracy report stay with the repository (``eval/testbed/train.py``, ``train_video.py``,
``evaluate.py``), next to the checkpoints they write (``eval/testbed/checkpoints``).
"""
