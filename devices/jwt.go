package devices

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Token errors. A token that fails is a refusal (401, CONNACK "bad
// username or password"), never a fall-back to anonymous.
var (
	ErrTokenInvalid = errors.New("invalid token")
	ErrTokenExpired = errors.New("token expired")
)

// BeaconClaims is the optional "beacon" claim of a token.
type BeaconClaims struct {
	Pub  []string `json:"pub,omitempty"`  // topic filters the holder may publish to
	Sub  []string `json:"sub,omitempty"`  // topic filters the holder may subscribe to
	Role string   `json:"role,omitempty"` // matched by role:R subjects; "admin" may use the admin API
}

// Claims are the claims Beacon reads: sub and exp are required.
type Claims struct {
	jwt.Claims
	Beacon *BeaconClaims `json:"beacon,omitempty"`
}

// JWTOptions configures a TokenVerifier. At least one key source is needed.
type JWTOptions struct {
	HS256Secret    []byte
	PublicKeyFiles []string // PEM: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA) public keys or certificates
	JWKSFile       string   // a JSON Web Key Set with public keys
	Issuer         string   // required iss when set
	Audience       string   // required aud when set
}

// TokenVerifier checks JWTs.
type TokenVerifier struct {
	hs     []byte
	keys   []jose.JSONWebKey
	iss    string
	aud    string
	leeway time.Duration
}

var algorithms = []jose.SignatureAlgorithm{jose.HS256, jose.RS256, jose.ES256, jose.EdDSA}

// NewTokenVerifier loads the keys.
func NewTokenVerifier(o JWTOptions) (*TokenVerifier, error) {
	v := &TokenVerifier{hs: o.HS256Secret, iss: o.Issuer, aud: o.Audience, leeway: 30 * time.Second}
	if len(o.HS256Secret) > 0 && len(o.HS256Secret) < 32 {
		return nil, errors.New("the HS256 secret must be at least 32 bytes")
	}
	for _, f := range o.PublicKeyFiles {
		k, err := loadPublicKey(f)
		if err != nil {
			return nil, err
		}
		v.keys = append(v.keys, jose.JSONWebKey{Key: k})
	}
	if o.JWKSFile != "" {
		data, err := os.ReadFile(o.JWKSFile)
		if err != nil {
			return nil, fmt.Errorf("read JWKS: %w", err)
		}
		var set jose.JSONWebKeySet
		if err := json.Unmarshal(data, &set); err != nil {
			return nil, fmt.Errorf("parse JWKS %s: %w", o.JWKSFile, err)
		}
		for _, k := range set.Keys {
			if !k.IsPublic() {
				return nil, fmt.Errorf("JWKS %s: key %q is not a public key", o.JWKSFile, k.KeyID)
			}
			v.keys = append(v.keys, k)
		}
	}
	if len(v.hs) == 0 && len(v.keys) == 0 {
		return nil, errors.New("no JWT key configured")
	}
	return v, nil
}

func loadPublicKey(path string) (crypto.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read public key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	var key any
	switch block.Type {
	case "CERTIFICATE":
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		key = cert.PublicKey
	case "PUBLIC KEY":
		key, err = x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	case "RSA PUBLIC KEY":
		key, err = x509.ParsePKCS1PublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	default:
		return nil, fmt.Errorf("%s: PEM block %q is not a public key or certificate", path, block.Type)
	}
	switch key.(type) {
	case *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey:
		return key, nil
	}
	return nil, fmt.Errorf("%s: unsupported key type %T", path, key)
}

// Verify checks the signature and claims of raw and returns the principal
// it names.
func (v *TokenVerifier) Verify(raw string, now time.Time) (Principal, error) {
	tok, err := jwt.ParseSigned(raw, algorithms)
	if err != nil {
		return Principal{}, fmt.Errorf("%w: %v", ErrTokenInvalid, err)
	}
	if len(tok.Headers) != 1 {
		return Principal{}, fmt.Errorf("%w: expected one signature", ErrTokenInvalid)
	}
	h := tok.Headers[0]
	var c Claims
	verified := false
	if jose.SignatureAlgorithm(h.Algorithm) == jose.HS256 {
		verified = len(v.hs) > 0 && tok.Claims(v.hs, &c) == nil
	} else {
		for _, k := range v.keys {
			if h.KeyID != "" && k.KeyID != "" && k.KeyID != h.KeyID {
				continue
			}
			if tok.Claims(k.Key, &c) == nil {
				verified = true
				break
			}
		}
	}
	if !verified {
		return Principal{}, fmt.Errorf("%w: signature not verified by any configured key", ErrTokenInvalid)
	}
	if c.Expiry == nil {
		return Principal{}, fmt.Errorf("%w: no exp claim", ErrTokenInvalid)
	}
	if c.Subject == "" {
		return Principal{}, fmt.Errorf("%w: no sub claim", ErrTokenInvalid)
	}
	exp := jwt.Expected{Issuer: v.iss, Time: now}
	if v.aud != "" {
		exp.AnyAudience = jwt.Audience{v.aud}
	}
	if err := c.ValidateWithLeeway(exp, v.leeway); err != nil {
		if errors.Is(err, jwt.ErrExpired) {
			return Principal{}, ErrTokenExpired
		}
		return Principal{}, fmt.Errorf("%w: %v", ErrTokenInvalid, err)
	}
	p := Principal{Kind: User, Name: c.Subject, Expires: c.Expiry.Time()}
	if b := c.Beacon; b != nil {
		for _, f := range append(append([]string(nil), b.Pub...), b.Sub...) {
			if err := validRuleFilter(f); err != nil {
				return Principal{}, fmt.Errorf("%w: beacon claim: %v", ErrTokenInvalid, err)
			}
		}
		p.Publish, p.Subscribe, p.Role = b.Pub, b.Sub, b.Role
	}
	return p, nil
}

// MintHS256 signs claims with secret. exp, sub and the beacon claim are
// what Beacon reads.
func MintHS256(secret []byte, c Claims) (string, error) {
	if len(secret) < 32 {
		return "", errors.New("the HS256 secret must be at least 32 bytes")
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: secret}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	return jwt.Signed(signer).Claims(c).Serialize()
}
