"""Layout-independent, verified, atomic checkpoints (chapters 4 and 6; ``lmkit train``, ``lmkit export``).

- `format`: the files of a checkpoint, its manifest (sizes and sha256 of every file, and its own
  hash) and how it is verified, RNG states, the atomic swap into place, run directories
  (``step_000123/``, ``latest``);
- `single`: the single-directory checkpoint (full weights in safetensors, the rest in state.pt),
  what one process saves and what generation and Hugging Face users load;
- `sharded`: the sharded checkpoint of a parallel run: every rank writes and reads only its own
  pieces through torch.distributed.checkpoint, resumable under any layout;
- `export`: a sharded checkpoint turned into a single directory (``lmkit export``).

The trainer (`lmkit.train`) saves and resumes through them, and the engines (`lmkit.parallel`) cut
their state into the sharded checkpoint's pieces.
"""
