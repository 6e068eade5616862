"""The pod rehearsal's local stand-ins: an offline Hugging Face cache seeded with tiny models of each
backbone family (`hub`), and a Google Cloud Storage emulator on a loopback port (`gcs`).

`python -m kardia_jax.rehearse` uses them to run a TPU config's real jobs as several JAX processes on
one machine; the tests use them to exercise the hub-id, `hf://` and `gs://` paths offline.
"""
