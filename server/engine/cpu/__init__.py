"""The CPU fast path, in one place: what a step runs on CPU instead of torch's general operators.

  kernels.py        builds and loads the C++ kernels in csrc/ (one torch extension, `torch.ops.softprompt`)
  linear.py         linear layers on weights packed once at start: our AVX2 kernel or oneDNN
  attention.py      a step's attention, decoding and prefilling requests, over the KV pool in one kernel call
  rowwise.py        the rotary embedding, bfloat16 RMS norms and MLP activation in one pass each
  native_decode.py  a step's layers in one C++ call, without the GIL, on either linear backend
  threads.py        the engine's torch threads and the CPUs they are confined to
  memory.py         glibc's malloc set to keep a step's freed activations for the next
  csrc/             common.cpp (task counter, CPU check), linear.cpp, attention.cpp, avx512.cpp (the code
                    written for AVX-512), rowwise.cpp, forward.cpp

Each is one flag away from the plain path (`server/engine/fast_path.py`), and the start-up self-check
(`server/engine/self_check.py`) compares what they compute with transformers' own forward.
"""
