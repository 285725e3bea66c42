"""Export: ONNX (fp32 / fp16 / int8 Q/DQ) with simplification, ORT offline optimization and parity checks; TensorRT.

``onnx.py`` causal-LM graphs (float export and checks, fp16, the Q/DQ passes), ``kv_cache.py`` decoder-with-past
graphs, ``ptq.py`` ORT PTQ baselines, ``int8.py`` checked INT8 export of a QAT model, ``tensorrt.py`` TensorRT
check + engine build, ``trt_check.py`` the static TensorRT check, ``cnn.py`` your own ``model(x)`` modules,
``bundle.py`` the deployable bundle.
"""
