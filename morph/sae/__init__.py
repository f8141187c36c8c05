"""The SAE pipeline: corpus, TopK sparse autoencoder, latent evidence, named features.

corpus.py (prompts + the model's continuations, captured while generating) -> train.py
(numpy TopK SAE) -> io.py (SAE GGUF) -> evidence.py (frequencies, top contexts) ->
select.py (contrast-set ranking, steering probes, default scales; combine.py: latents with
the diffmean signal) -> interpret.py (self-explanation) -> build.py (`morph vectors build`).
"""
