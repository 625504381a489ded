"""Verifies keygate's X-Keygate-Assertion the way an upstream would: PyJWT and its JWKS
client (pip install 'pyjwt[crypto]'). Call verify(request.headers["X-Keygate-Assertion"])
in a handler, or from a shell:

    python3 verify.py JWKS_URL AUDIENCE [ISSUER] < assertion

prints the claims, or exits 1 with the reason the assertion was rejected.
"""
import json
import sys

import jwt

JWKS_URL, AUDIENCE = sys.argv[1], sys.argv[2]
ISSUER = sys.argv[3] if len(sys.argv) > 3 else "keygate"
# Caches the key set; fetches it again when an assertion names a key it does not know yet.
jwks = jwt.PyJWKClient(JWKS_URL, lifespan=300)
# Seconds the clocks of keygate and this host may differ by: iat is keygate's clock, and PyJWT
# refuses an iat ahead of its own clock (ImmatureSignatureError) without leeway.
LEEWAY = 5


def verify(assertion):
    key = jwks.get_signing_key_from_jwt(assertion)
    return jwt.decode(
        assertion, key, algorithms=["EdDSA", "ES256"], audience=AUDIENCE, issuer=ISSUER,
        leeway=LEEWAY, options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
    )


if __name__ == "__main__":
    try:
        print(json.dumps(verify(sys.stdin.read().strip())))
    except jwt.PyJWTError as e:
        sys.exit(f"rejected: {type(e).__name__}: {e}")
