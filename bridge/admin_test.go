package bridge

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestLocalTokenOnlyFromLoopback: the broker's local admin credential
// opens the admin API to a loopback peer only, in the Authorization header
// only, and whatever X-Forwarded-For claims.
func TestLocalTokenOnlyFromLoopback(t *testing.T) {
	a := &Admin{LocalToken: "local-0123456789", Log: slog.Default()}
	h := a.Require(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	for _, tc := range []struct {
		name, remote, auth, cookie, xff string
		want                            int
	}{
		{"loopback v4", "127.0.0.1:40000", "Bearer local-0123456789", "", "", http.StatusNoContent},
		{"loopback v6", "[::1]:40000", "Bearer local-0123456789", "", "", http.StatusNoContent},
		{"remote peer", "192.0.2.7:40000", "Bearer local-0123456789", "", "", http.StatusForbidden},
		{"remote peer claiming loopback", "192.0.2.7:40000", "Bearer local-0123456789", "", "127.0.0.1", http.StatusForbidden},
		{"wrong token", "127.0.0.1:40000", "Bearer local-x", "", "", http.StatusForbidden},
		{"in a cookie", "127.0.0.1:40000", "", "local-0123456789", "", http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "/api/v1/devices", nil)
			r.RemoteAddr = tc.remote
			if tc.auth != "" {
				r.Header.Set("Authorization", tc.auth)
			}
			if tc.cookie != "" {
				r.AddCookie(&http.Cookie{Name: TokenCookie, Value: tc.cookie})
			}
			if tc.xff != "" {
				r.Header.Set("X-Forwarded-For", tc.xff)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tc.want {
				t.Fatalf("got %d %s, want %d", w.Code, w.Body, tc.want)
			}
		})
	}
}
