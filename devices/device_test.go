package devices_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/beaconmq/beacon/devices"
	"github.com/beaconmq/beacon/storage"
)

func openStore(t *testing.T, dir string) *storage.DB {
	t.Helper()
	db, err := storage.Open(storage.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Shutdown(context.Background()) })
	return db
}

func TestRegistry(t *testing.T) {
	dir := t.TempDir()
	db := openStore(t, dir)
	r, err := devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	d, secret, err := r.Add(devices.NewDevice{ID: "kitchen-1", Type: "thermostat", Tags: map[string]string{"room": "kitchen"}})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "kitchen-1" || !d.Enabled || d.SecretHash != nil || len(secret) < 43 {
		t.Fatalf("added: %+v, secret of %d chars", d, len(secret))
	}
	if _, _, err := r.Add(devices.NewDevice{ID: "kitchen-1"}); !errors.Is(err, devices.ErrExists) {
		t.Fatalf("duplicate: %v", err)
	}
	var fe *devices.FieldError
	if _, _, err := r.Add(devices.NewDevice{ID: "bad/id"}); !errors.As(err, &fe) || fe.Field != "id" || !errors.Is(err, devices.ErrInvalid) {
		t.Fatalf("bad id: %v", err)
	}
	if _, err := r.Authenticate("kitchen-1", secret); err != nil {
		t.Fatalf("right secret: %v", err)
	}
	for _, tc := range []struct{ id, secret string }{{"kitchen-1", "wrong"}, {"nobody", secret}, {"kitchen-1", ""}} {
		if _, err := r.Authenticate(tc.id, tc.secret); !errors.Is(err, devices.ErrBadCredentials) {
			t.Fatalf("Authenticate(%q, %q) = %v", tc.id, tc.secret, err)
		}
	}
	off := false
	if _, err := r.Update("kitchen-1", devices.Update{Enabled: &off}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Authenticate("kitchen-1", secret); !errors.Is(err, devices.ErrDisabled) {
		t.Fatalf("disabled: %v", err)
	}
	on := true
	if _, err := r.Update("kitchen-1", devices.Update{Enabled: &on}); err != nil {
		t.Fatal(err)
	}
	newSecret, err := r.Rotate("kitchen-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Authenticate("kitchen-1", secret); err == nil {
		t.Fatal("the old secret still works after rotation")
	}
	r.SetOnline("kitchen-1", true)

	// Everything but the online flag survives a reopen; the secret is not stored.
	if err := db.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	db = openStore(t, dir)
	r, err = devices.OpenRegistry(db)
	if err != nil {
		t.Fatal(err)
	}
	got, err := r.Get("kitchen-1")
	if err != nil || got.Type != "thermostat" || got.Tags["room"] != "kitchen" || got.LastSeen.IsZero() || got.Online {
		t.Fatalf("after reopen: %+v %v", got, err)
	}
	if _, err := r.Authenticate("kitchen-1", newSecret); err != nil {
		t.Fatalf("rotated secret after reopen: %v", err)
	}
	raw := map[string]any{}
	_ = db.Scan(storage.DeviceKey(""), func(_, v []byte) error { return json.Unmarshal(v, &raw) })
	if s, _ := raw["secret_hash"].(string); s == "" || s == newSecret {
		t.Fatalf("stored secret_hash %q must be a hash, not the secret", s)
	}
	if err := r.Remove("kitchen-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get("kitchen-1"); !errors.Is(err, devices.ErrNotFound) {
		t.Fatalf("after remove: %v", err)
	}
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func sign(t *testing.T, alg jose.SignatureAlgorithm, key any, kid string, c devices.Claims) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(s).Claims(c).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func claims(sub string, exp time.Duration) devices.Claims {
	c := devices.Claims{Beacon: &devices.BeaconClaims{Pub: []string{"home/cmd/#"}, Sub: []string{"home/#"}, Role: "viewer"}}
	c.Subject = sub
	if exp != 0 {
		c.Expiry = jwt.NewNumericDate(time.Now().Add(exp))
	}
	return c
}

func TestTokens(t *testing.T) {
	dir := t.TempDir()
	secret := []byte("0123456789abcdef0123456789abcdef")
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	edPub, edKey, _ := ed25519.GenerateKey(rand.Reader)
	rsaDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	ecDER, _ := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	jwks := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: edPub, KeyID: "ed-1", Algorithm: "EdDSA", Use: "sig"}}}
	jwksData, _ := json.Marshal(jwks)
	jwksFile := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwksFile, jwksData, 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := devices.NewTokenVerifier(devices.JWTOptions{
		HS256Secret:    secret,
		PublicKeyFiles: []string{writePEM(t, dir, "rsa.pem", "PUBLIC KEY", rsaDER), writePEM(t, dir, "ec.pem", "PUBLIC KEY", ecDER)},
		JWKSFile:       jwksFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	otherRSA, _ := rsa.GenerateKey(rand.Reader, 2048)
	minted, err := devices.MintHS256(secret, claims("ha", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	good := []struct{ name, tok string }{
		{"HS256 minted", minted},
		{"RS256", sign(t, jose.RS256, rsaKey, "", claims("svc", time.Hour))},
		{"ES256", sign(t, jose.ES256, ecKey, "", claims("svc", time.Hour))},
		{"EdDSA from JWKS", sign(t, jose.EdDSA, edKey, "ed-1", claims("svc", time.Hour))},
	}
	for _, tc := range good {
		p, err := v.Verify(tc.tok, time.Now())
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if p.Kind != devices.User || p.Role != "viewer" || len(p.Publish) != 1 || p.Expires.IsZero() {
			t.Fatalf("%s: principal %+v", tc.name, p)
		}
	}
	bad := []struct {
		name, tok string
		want      error
	}{
		{"expired", sign(t, jose.HS256, secret, "", claims("x", -time.Hour)), devices.ErrTokenExpired},
		{"no exp", sign(t, jose.HS256, secret, "", claims("x", 0)), devices.ErrTokenInvalid},
		{"no sub", sign(t, jose.HS256, secret, "", claims("", time.Hour)), devices.ErrTokenInvalid},
		{"wrong HS256 secret", sign(t, jose.HS256, []byte("another-secret-of-32-bytes-000000"), "", claims("x", time.Hour)), devices.ErrTokenInvalid},
		{"unknown RSA key", sign(t, jose.RS256, otherRSA, "", claims("x", time.Hour)), devices.ErrTokenInvalid},
		{"garbage", "eyJhbGciOi.not.a-token", devices.ErrTokenInvalid},
		{"bad claim filter", sign(t, jose.HS256, secret, "", devices.Claims{Claims: jwt.Claims{Subject: "x", Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour))},
			Beacon: &devices.BeaconClaims{Pub: []string{"a/#/b"}}}), devices.ErrTokenInvalid},
	}
	for _, tc := range bad {
		if _, err := v.Verify(tc.tok, time.Now()); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}

	iv, err := devices.NewTokenVerifier(devices.JWTOptions{HS256Secret: secret, Issuer: "beacon", Audience: "mqtt"})
	if err != nil {
		t.Fatal(err)
	}
	c := claims("x", time.Hour)
	c.Issuer, c.Audience = "beacon", jwt.Audience{"mqtt"}
	if _, err := iv.Verify(sign(t, jose.HS256, secret, "", c), time.Now()); err != nil {
		t.Fatalf("issuer and audience: %v", err)
	}
	c.Audience = jwt.Audience{"web"}
	if _, err := iv.Verify(sign(t, jose.HS256, secret, "", c), time.Now()); !errors.Is(err, devices.ErrTokenInvalid) {
		t.Fatalf("wrong audience: %v", err)
	}
	if _, err := devices.NewTokenVerifier(devices.JWTOptions{HS256Secret: []byte("short")}); err == nil {
		t.Fatal("a short HS256 secret was accepted")
	}
}
