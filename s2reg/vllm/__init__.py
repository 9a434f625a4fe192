"""Stored s2reg adapters served by vLLM by name: a ``vllm.general_plugins`` plugin with a ``LoRAResolver``.

With s2reg installed in vLLM's environment, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE
--enable-lora`` answers a request whose ``model`` is a stored ``NAME[:TAG]`` (or ``hf://ORG/REPO[@REV]``)
with that adapter, exported to PEFT LoRA once per adapter digest (:mod:`.lora_cache`, engine-agnostic)
and handed to vLLM by the resolver (:mod:`.plugin`, the only module that imports vLLM).
docs/serving.md ("vLLM: adapters by name") shows the set-up.
"""
