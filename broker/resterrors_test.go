package broker_test

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestRESTErrorsSayWhatToSend: a publish without a JSON content type (and
// no ?topic= for a raw body) is 415 naming the type, a malformed body 400,
// and a wrong method 405 with Allow, before any authentication answer.
func TestRESTErrorsSayWhatToSend(t *testing.T) {
	b, _ := startBroker(t, nil)
	base := "http://" + b.HTTPAddr() + "/api/v1"
	for _, tc := range []struct {
		name, method, path, ctype, body string
		code                            int
		want, allow                     string
	}{
		{"form body (curl -d)", "POST", "/publish", "application/x-www-form-urlencoded", `{"topic":"a/b","payload":"x"}`, 415, "application/json", ""},
		{"no content type", "POST", "/publish", "", `{"topic":"a/b"}`, 415, "application/json", ""},
		{"malformed JSON", "POST", "/publish", "application/json", `{"topic":`, 400, "not a JSON object", ""},
		{"JSON with charset", "POST", "/publish", "application/json; charset=utf-8", `{"topic":"a/b","payload":"x"}`, 200, "", ""},
		{"raw body with ?topic", "POST", "/publish?topic=a/b", "text/plain", `21.5`, 200, "", ""},
		{"GET publish", "GET", "/publish", "", "", 405, "POST", "POST"},
		{"DELETE retained", "DELETE", "/retained?topic=a", "", "", 405, "GET", "GET, HEAD"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, base+tc.path, strings.NewReader(tc.body))
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.want) {
				t.Fatalf("%d %q, want %d containing %q", resp.StatusCode, body, tc.code, tc.want)
			}
			if got := resp.Header.Get("Allow"); got != tc.allow {
				t.Fatalf("Allow %q, want %q", got, tc.allow)
			}
		})
	}
}
