package main

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"net/http"
	"time"

	"github.com/beaconmq/beacon/broker"
)

// localAPIAdmin is the admin API of the broker that holds the data
// directory dir, found through the file it writes there
// (broker.LocalAdminFile): its address and a credential it accepts from
// this machine only. ok is false when there is no such file.
func localAPIAdmin(dir string) (_ *apiAdmin, ok bool) {
	la, err := broker.ReadLocalAdmin(dir)
	if err != nil {
		return nil, false
	}
	tr := &http.Transport{Proxy: nil} // loopback: never through a proxy
	if la.CertSHA256 != "" {
		// The certificate names the public host, not 127.0.0.1: pin the one
		// the broker wrote down instead of verifying the name.
		want := la.CertSHA256
		tr.TLSClientConfig = &tls.Config{
			InsecureSkipVerify: true, //nolint:gosec // verified by VerifyPeerCertificate against the pinned hash
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) > 0 {
					sum := sha256.Sum256(raw[0])
					if hex.EncodeToString(sum[:]) == want {
						return nil
					}
				}
				return errors.New("the broker's certificate is not the one in its local admin file")
			},
		}
	}
	return &apiAdmin{base: la.URL, token: la.Token, client: &http.Client{Timeout: 10 * time.Second, Transport: tr}}, true
}
