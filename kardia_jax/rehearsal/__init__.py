"""The pod rehearsal's machinery and its local stand-ins: the jobs run as several JAX processes and what
they wrote (`jobs`), the SIGKILL / SIGTERM / resume run (`faults`), an offline Hugging Face cache seeded
with tiny models of each backbone family (`hub`), and a Google Cloud Storage emulator on a loopback port
(`gcs`).

`python -m kardia_jax.rehearse` uses them to run a TPU config's real jobs as several JAX processes on
one machine; the tests use the stand-ins to exercise the hub-id, `hf://` and `gs://` paths offline.
"""
