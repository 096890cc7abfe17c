package broker

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// LocalAdminFile is the file, in the data directory, in which a running
// broker tells the CLI on the same machine how to reach its admin API: the
// address and a random credential accepted only from loopback. It is
// written mode 0600 once HTTP listens and removed on a clean stop; after a
// crash it stays behind, stale, and is replaced at the next start.
const LocalAdminFile = "admin.json"

// LocalAdmin is the content of LocalAdminFile.
type LocalAdmin struct {
	URL   string `json:"url"`   // http://127.0.0.1:PORT (https with http.tls_cert)
	Token string `json:"token"` // Bearer credential, loopback peers only
	// CertSHA256 is the SHA-256 of the HTTP server's certificate (DER, hex)
	// under http.tls_cert: the CLI pins it, since the certificate names
	// the public host, not 127.0.0.1.
	CertSHA256 string `json:"cert_sha256,omitempty"`
	PID        int    `json:"pid"`
}

// ReadLocalAdmin reads LocalAdminFile in the data directory dir.
func ReadLocalAdmin(dir string) (LocalAdmin, error) {
	var la LocalAdmin
	data, err := os.ReadFile(filepath.Join(dir, LocalAdminFile))
	if err != nil {
		return la, err
	}
	if err := json.Unmarshal(data, &la); err != nil || la.URL == "" || la.Token == "" {
		return la, fmt.Errorf("%s: not a local admin file", filepath.Join(dir, LocalAdminFile))
	}
	return la, nil
}

// newLocalToken returns 256 random bits, hex.
func newLocalToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// writeLocalAdmin writes LocalAdminFile for the bound HTTP listener:
// a temporary file made 0600, then renamed over the old one.
func (b *Broker) writeLocalAdmin() error {
	if b.httpLn == nil || b.admin.LocalToken == "" {
		return nil
	}
	_, port, err := net.SplitHostPort(b.httpLn.Addr().String())
	if err != nil {
		return err
	}
	la := LocalAdmin{URL: "http://" + net.JoinHostPort("127.0.0.1", port), Token: b.admin.LocalToken, PID: os.Getpid()}
	if b.cfg.HTTP.TLSCert != "" {
		la.URL = "https://" + net.JoinHostPort("127.0.0.1", port)
		cert, err := tls.LoadX509KeyPair(b.cfg.HTTP.TLSCert, b.cfg.HTTP.TLSKey)
		if err != nil || len(cert.Certificate) == 0 {
			return fmt.Errorf("read http.tls_cert: %w", errors.Join(err, errors.New("no certificate")))
		}
		sum := sha256.Sum256(cert.Certificate[0])
		la.CertSHA256 = hex.EncodeToString(sum[:])
	}
	data, err := json.Marshal(la)
	if err != nil {
		return err
	}
	path := filepath.Join(b.cfg.Storage.Dir, LocalAdminFile)
	tmp, err := os.CreateTemp(b.cfg.Storage.Dir, LocalAdminFile+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		_ = tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// removeLocalAdmin removes LocalAdminFile if it is this broker's.
func (b *Broker) removeLocalAdmin() {
	if b.admin == nil || b.admin.LocalToken == "" {
		return
	}
	la, err := ReadLocalAdmin(b.cfg.Storage.Dir)
	if err == nil && la.Token == b.admin.LocalToken {
		_ = os.Remove(filepath.Join(b.cfg.Storage.Dir, LocalAdminFile))
	}
}
