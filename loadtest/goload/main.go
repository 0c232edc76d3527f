// Command chimera-goload is the closed-loop gRPC load client of `chimera bench`: one connection, N
// goroutines, each sending its next call as soon as the previous one is answered, for a warm-up and
// then a measured window. It is written in Go because Chimera's callers are Go services and because a
// Python client spends much of a 2-core machine itself (issue 17): grpc-go on one connection costs a
// fraction of grpc.aio's CPU per call, so the server is what gets measured.
//
//	chimera-goload -target 127.0.0.1:50051 -kind predict -c 64 -duration 10s -warmup 2s \
//	    -model bench -rows rows.json [-named] [-metadata application=app]
//
// -rows is a JSON file {"rows": [[f0, f1, ...], ...], "feature_names": [...]}: rows are sent in turn,
// dense by default, by name with -named. Routing keys cycle through user-0..user-{n_keys-1} with the
// same formula as the Python client (loadtest/closed_loop.py), so both clients route alike.
//
// Kinds: predict (unary Predict), batch (PredictBatch with message rows), packed (PredictBatch with a
// DenseMatrix), stream (PredictStream ping-pong: one message in flight per goroutine, one stream each).
// Only calls that start after the warm-up and end inside the window count. Every answer is checked
// (score in [0, 1], a request id, the right number of rows); a bad one counts as BAD_RESPONSE.
//
// Output: one JSON object on stdout with requests, rows, errors and error_codes (gRPC code names as
// Python's grpc spells them), window_s, rps, rows_per_s and p50/p90/p99/max latency in milliseconds from
// every measured call's latency (sorted samples: exact, not bucketed). Exit 2 on bad flags, 1 when the
// connection cannot be made.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	chimerav1 "github.com/chimera-ml/chimera/gen/go/chimera/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const maxMessage = 64 << 20

// codeNames spells gRPC codes as Python's grpc.StatusCode does, so both clients report alike.
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL",
	codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

func codeName(err error) string {
	if err == io.EOF {
		return "EOF"
	}
	c := status.Code(err)
	if name, ok := codeNames[c]; ok {
		return name
	}
	return c.String()
}

type options struct {
	target, kind, model, rowsPath, metadata string
	concurrency, batchRows, nKeys, seed     int
	conns                                   int
	duration, warmup, timeout               time.Duration
	named                                   bool
	rate                                    float64
}

type rowsFile struct {
	Rows         [][]float64 `json:"rows"`
	FeatureNames []string    `json:"feature_names"`
}

type result struct {
	Client       string         `json:"client"`
	Go           string         `json:"go"`
	Kind         string         `json:"kind"`
	Concurrency  int            `json:"concurrency"`
	Requests     int            `json:"requests"`
	Rows         int            `json:"rows"`
	Errors       int            `json:"errors"`
	ErrorCodes   map[string]int `json:"error_codes"`
	WindowS      float64        `json:"window_s"`
	Rps          float64        `json:"rps"`
	RowsPerS     float64        `json:"rows_per_s"`
	P50Ms        *float64       `json:"p50_ms"`
	P90Ms        *float64       `json:"p90_ms"`
	P99Ms        *float64       `json:"p99_ms"`
	MaxMs        *float64       `json:"max_ms"`
	Unmeasured   int            `json:"unmeasured_calls"`
	ConnectMs    float64        `json:"connect_ms"`
	Conns        int            `json:"conns"`
	GoMaxProcs   int            `json:"gomaxprocs"`
	BadResponses int            `json:"bad_responses"`
}

// routingKey is loadtest/closed_loop.py's key for call i of worker 0.
func routingKey(i int, o *options) string {
	return fmt.Sprintf("user-%d", (i*7919+o.seed)%o.nKeys)
}

func predictRequest(i int, o *options, rf *rowsFile) *chimerav1.PredictRequest {
	row := rf.Rows[i%len(rf.Rows)]
	req := &chimerav1.PredictRequest{Model: o.model, RoutingKey: routingKey(i, o)}
	if o.named {
		req.Features = make(map[string]float64, len(row))
		for j, name := range rf.FeatureNames {
			req.Features[name] = row[j]
		}
	} else {
		req.Dense = append([]float64(nil), row...)
	}
	return req
}

// batchRequest is request j of a batch kind: rows j*batchRows .. (j+1)*batchRows-1.
func batchRequest(j int, o *options, rf *rowsFile) *chimerav1.PredictBatchRequest {
	base := j * o.batchRows
	if o.kind == "batch" {
		rows := make([]*chimerav1.PredictRequest, o.batchRows)
		for k := range rows {
			rows[k] = predictRequest(base+k, o, rf)
		}
		return &chimerav1.PredictBatchRequest{Model: o.model, Rows: rows}
	}
	cols := len(rf.Rows[0])
	buf := make([]byte, 4*cols*o.batchRows)
	keys := make([]string, o.batchRows)
	for k := 0; k < o.batchRows; k++ {
		row := rf.Rows[(base+k)%len(rf.Rows)]
		for c, v := range row {
			binary.LittleEndian.PutUint32(buf[4*(k*cols+c):], math.Float32bits(float32(v)))
		}
		keys[k] = routingKey(base+k, o)
	}
	return &chimerav1.PredictBatchRequest{Model: o.model, Matrix: &chimerav1.DenseMatrix{
		F32: buf, Cols: int32(cols), RoutingKeys: keys}}
}

func checkPredict(r *chimerav1.PredictResponse) bool {
	return r != nil && r.GetRequestId() != "" && r.GetScore() >= 0 && r.GetScore() <= 1
}

func checkBatch(r *chimerav1.PredictBatchResponse, o *options) bool {
	if o.kind == "packed" {
		if len(r.GetScores()) != o.batchRows {
			return false
		}
		for _, s := range r.GetScores() {
			if s < 0 || s > 1 {
				return false
			}
		}
		return true
	}
	if len(r.GetResults()) != o.batchRows {
		return false
	}
	for _, p := range r.GetResults() {
		if !checkPredict(p) {
			return false
		}
	}
	return true
}

// caller is one goroutine's tally: latencies of measured OK calls (microseconds) and error codes.
type caller struct {
	lat   []int64
	codes map[string]int
	other int // calls outside the measured window
}

type window struct{ start, measureFrom, stopAt time.Time }

func (w window) record(c *caller, t0, t1 time.Time, code string) {
	if t0.Before(w.measureFrom) || t1.After(w.stopAt) {
		c.other++
		return
	}
	if code != "" {
		c.codes[code]++
		return
	}
	us := t1.Sub(t0).Microseconds()
	if us < 1 {
		us = 1
	}
	c.lat = append(c.lat, us)
}

// pace sleeps until call k of goroutine g is due when -rate paces the callers (as closed_loop.py).
func pace(o *options, w window, g, k int) {
	if o.rate <= 0 {
		return
	}
	perCaller := o.rate / float64(o.concurrency)
	due := w.start.Add(time.Duration((float64(k) + float64(g)/float64(o.concurrency)) / perCaller * 1e9))
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}

func unaryCaller(ctx context.Context, conn *grpc.ClientConn, o *options, w window, g int,
	predicts []*chimerav1.PredictRequest, batches []*chimerav1.PredictBatchRequest, c *caller) {
	client := chimerav1.NewPredictionServiceClient(conn)
	for i, k := g, 0; ; i, k = i+o.concurrency, k+1 {
		pace(o, w, g, k)
		t0 := time.Now()
		if !t0.Before(w.stopAt) {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, o.timeout)
		code := ""
		if batches != nil {
			resp, err := client.PredictBatch(cctx, batches[i%len(batches)])
			if err != nil {
				code = codeName(err)
			} else if !checkBatch(resp, o) {
				code = "BAD_RESPONSE"
			}
		} else {
			resp, err := client.Predict(cctx, predicts[i%len(predicts)])
			if err != nil {
				code = codeName(err)
			} else if !checkPredict(resp) {
				code = "BAD_RESPONSE"
			}
		}
		cancel()
		w.record(c, t0, time.Now(), code)
	}
}

// streamCaller runs one PredictStream with one message in flight: send, wait for its answer, repeat.
func streamCaller(ctx context.Context, conn *grpc.ClientConn, o *options, w window, g int,
	predicts []*chimerav1.PredictRequest, c *caller) {
	client := chimerav1.NewPredictionServiceClient(conn)
	sctx, cancel := context.WithDeadline(ctx, w.stopAt.Add(60*time.Second))
	defer cancel()
	stream, err := client.PredictStream(sctx)
	if err != nil {
		c.codes[codeName(err)]++
		return
	}
	for i := g; ; i += o.concurrency {
		t0 := time.Now()
		if !t0.Before(w.stopAt) {
			break
		}
		if err := stream.Send(predicts[i%len(predicts)]); err != nil {
			_, rerr := stream.Recv() // the stream's status is read from Recv
			c.codes[codeName(rerr)]++
			return
		}
		resp, err := stream.Recv()
		code := ""
		if err != nil {
			c.codes[codeName(err)]++
			return
		} else if !checkPredict(resp.GetPrediction()) {
			code = "BAD_RESPONSE"
		}
		w.record(c, t0, time.Now(), code)
	}
	if err := stream.CloseSend(); err != nil {
		return
	}
	for {
		if _, err := stream.Recv(); err != nil {
			if err != io.EOF {
				c.codes[codeName(err)]++
			}
			return
		}
	}
}

// percentile is the nearest-rank percentile of sorted values (the smallest value with at least p % of
// the values at or below it, as an HDR histogram reports it), in milliseconds.
func percentile(sorted []int64, p float64) *float64 {
	if len(sorted) == 0 {
		return nil
	}
	idx := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if idx < 0 {
		idx = 0
	}
	v := float64(sorted[idx]) / 1e3
	return &v
}

func parseFlags() (*options, error) {
	o := &options{}
	flag.StringVar(&o.target, "target", "127.0.0.1:50051", "host:port of the server")
	flag.StringVar(&o.kind, "kind", "predict", "predict, batch, packed or stream")
	flag.IntVar(&o.concurrency, "c", 1, "concurrent callers (goroutines), spread over the connections")
	flag.IntVar(&o.conns, "conns", 1, "connections (ClientConns); caller g uses connection g mod conns")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured window")
	flag.DurationVar(&o.warmup, "warmup", 2*time.Second, "unmeasured time before the window")
	flag.StringVar(&o.model, "model", "", "model name in every request")
	flag.StringVar(&o.rowsPath, "rows", "", `JSON file {"rows": [[...]], "feature_names": [...]}`)
	flag.BoolVar(&o.named, "named", false, "send features by name (feature_names) instead of dense")
	flag.IntVar(&o.batchRows, "batch-rows", 256, "rows per PredictBatch request")
	flag.StringVar(&o.metadata, "metadata", "", "call metadata, k=v[,k=v...] (e.g. application=app)")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "deadline of each call")
	flag.IntVar(&o.nKeys, "n-keys", 100000, "routing keys cycle through user-0..user-{n-keys - 1}")
	flag.IntVar(&o.seed, "seed", 0, "offset of the routing keys")
	flag.Float64Var(&o.rate, "rate", 0, "> 0: callers pace themselves to this total rate (requests/s)")
	flag.Parse()
	switch {
	case o.kind != "predict" && o.kind != "batch" && o.kind != "packed" && o.kind != "stream":
		return nil, fmt.Errorf("-kind %q: want predict, batch, packed or stream", o.kind)
	case o.concurrency < 1 || o.batchRows < 1 || o.nKeys < 1:
		return nil, fmt.Errorf("-c, -batch-rows and -n-keys must be positive")
	case o.rowsPath == "":
		return nil, fmt.Errorf("-rows is required")
	case o.duration <= 0 || o.warmup < 0 || o.timeout <= 0:
		return nil, fmt.Errorf("-duration and -timeout must be positive, -warmup not negative")
	}
	return o, nil
}

func main() {
	o, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "chimera-goload:", err)
		os.Exit(2)
	}
	data, err := ioutil.ReadFile(o.rowsPath)
	rf := &rowsFile{}
	if err == nil {
		err = json.Unmarshal(data, rf)
	}
	if err == nil && (len(rf.Rows) == 0 || len(rf.Rows[0]) == 0) {
		err = fmt.Errorf("no rows")
	}
	if err == nil && o.named && len(rf.FeatureNames) != len(rf.Rows[0]) {
		err = fmt.Errorf("-named needs one feature name per column")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "chimera-goload: -rows %s: %v\n", o.rowsPath, err)
		os.Exit(2)
	}

	ctx := context.Background()
	if o.metadata != "" {
		var kv []string
		for _, pair := range strings.Split(o.metadata, ",") {
			parts := strings.SplitN(pair, "=", 2)
			if len(parts) != 2 {
				fmt.Fprintf(os.Stderr, "chimera-goload: -metadata %q: want k=v\n", pair)
				os.Exit(2)
			}
			kv = append(kv, parts[0], parts[1])
		}
		ctx = metadata.AppendToOutgoingContext(ctx, kv...)
	}

	// Requests are built once up front, so the callers spend their CPU on gRPC.
	var predicts []*chimerav1.PredictRequest
	var batches []*chimerav1.PredictBatchRequest
	if o.kind == "batch" || o.kind == "packed" {
		for j := 0; j < 64; j++ {
			batches = append(batches, batchRequest(j, o, rf))
		}
	} else {
		for i := 0; i < 2048; i++ {
			predicts = append(predicts, predictRequest(i, o, rf))
		}
	}

	if o.conns < 1 {
		fmt.Fprintln(os.Stderr, "chimera-goload: -conns must be at least 1")
		os.Exit(2)
	}
	// Several connections (one ClientConn each, as a Go service with a pool has): behind one port
	// shared by several gateway processes (SO_REUSEPORT), the kernel spreads connections, not calls.
	connectStart := time.Now()
	conns := make([]*grpc.ClientConn, o.conns)
	for i := range conns {
		dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
		conn, err := grpc.DialContext(dctx, o.target, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)))
		dcancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "chimera-goload: connect %s: %v\n", o.target, err)
			os.Exit(1)
		}
		defer conn.Close()
		conns[i] = conn
	}
	connectMs := float64(time.Since(connectStart).Microseconds()) / 1e3

	start := time.Now()
	w := window{start: start, measureFrom: start.Add(o.warmup), stopAt: start.Add(o.warmup + o.duration)}
	callers := make([]*caller, o.concurrency)
	var wg sync.WaitGroup
	for g := range callers {
		callers[g] = &caller{codes: map[string]int{}}
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			conn := conns[g%len(conns)]
			if o.kind == "stream" {
				streamCaller(ctx, conn, o, w, g, predicts, callers[g])
			} else {
				unaryCaller(ctx, conn, o, w, g, predicts, batches, callers[g])
			}
		}(g)
	}
	wg.Wait()

	res := result{Client: "go", Go: runtime.Version(), Kind: o.kind, Concurrency: o.concurrency,
		ErrorCodes: map[string]int{}, WindowS: o.duration.Seconds(), ConnectMs: connectMs, Conns: o.conns,
		GoMaxProcs: runtime.GOMAXPROCS(0)}
	var all []int64
	for _, c := range callers {
		all = append(all, c.lat...)
		res.Unmeasured += c.other
		for code, n := range c.codes {
			res.ErrorCodes[code] += n
			res.Errors += n
		}
	}
	res.BadResponses = res.ErrorCodes["BAD_RESPONSE"]
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	rowsPerCall := 1
	if batches != nil {
		rowsPerCall = o.batchRows
	}
	res.Requests = len(all)
	res.Rows = len(all) * rowsPerCall
	res.Rps = float64(res.Requests) / res.WindowS
	res.RowsPerS = float64(res.Rows) / res.WindowS
	res.P50Ms, res.P90Ms, res.P99Ms = percentile(all, 50), percentile(all, 90), percentile(all, 99)
	res.MaxMs = percentile(all, 100)
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}
