"""envfs's C extensions: envfs._gcm (AES-GCM of a request's blocks through OpenSSL) and envfs._signer
(the thread that derives file keys ahead on the PKCS#11 session); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("envfs._gcm", ["envfs/_gcm.c"], libraries=["crypto"], extra_compile_args=["-O2"]),
        Extension("envfs._signer", ["envfs/_signer.c"], extra_compile_args=["-O2", "-Wall"]),
    ]
)
