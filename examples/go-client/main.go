// Command chimera-go-client calls the Chimera gateway from Go: Predict with named features,
// PredictBatch, RecordOutcome and RecordOutcomes, each with a deadline.
//
//	chimera-go-client -target 127.0.0.1:50051 -model signal-confidence \
//	    -features f0=0.1,f1=-0.3,f2=1.2,f3=0.4 -routing-key user-42 -batch 3 -outcome 1
//
// With -oip it speaks the Open Inference Protocol v2 instead (inference.GRPCInferenceService, as a
// KServe or Triton client would): ServerReady, ModelMetadata, then ModelInfer of one row (the
// -features values in the order given, which must be the version's schema order) with the routing
// key and request id as request parameters, then RecordOutcome with the request id it returned.
//
// Every result is printed as one line (key=value, or JSON with -json). A failed call prints its gRPC
// status code and message to stderr and exits 1.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	chimerav1 "github.com/chimera-ml/chimera/gen/go/chimera/v1"
	"github.com/chimera-ml/chimera/gen/go/inference"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func parseFeatures(s string) (map[string]float64, error) {
	out := map[string]float64{}
	for _, kv := range strings.Split(s, ",") {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		parts := strings.SplitN(kv, "=", 2)
		if len(parts) != 2 {
			return nil, fmt.Errorf("feature %q: want name=value", kv)
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(parts[1]), 64)
		if err != nil {
			return nil, fmt.Errorf("feature %q: %v", parts[0], err)
		}
		out[strings.TrimSpace(parts[0])] = v
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no features given")
	}
	return out, nil
}

// orderedValues returns the values of name=value pairs in the order given (an OIP tensor is dense).
func orderedValues(s string) []float32 {
	var out []float32
	for _, kv := range strings.Split(s, ",") {
		parts := strings.SplitN(strings.TrimSpace(kv), "=", 2)
		if len(parts) == 2 {
			v, _ := strconv.ParseFloat(strings.TrimSpace(parts[1]), 64)
			out = append(out, float32(v))
		}
	}
	return out
}

func stringParam(s string) *inference.InferParameter {
	return &inference.InferParameter{ParameterChoice: &inference.InferParameter_StringParam{StringParam: s}}
}

// modelInfer scores one row over the Open Inference Protocol and returns its request id, version and
// score, read from the outputs (raw little-endian contents; BYTES elements carry a 4-byte length).
func modelInfer(conn *grpc.ClientConn, call func() (context.Context, context.CancelFunc), model string,
	values []float32, routingKey, requestID string, version int, out printer) string {
	client := inference.NewGRPCInferenceServiceClient(conn)
	ctx, cancel := call()
	ready, err := client.ServerReady(ctx, &inference.ServerReadyRequest{})
	cancel()
	if err != nil {
		fail("ServerReady", err)
	}
	ctx, cancel = call()
	meta, err := client.ModelMetadata(ctx, &inference.ModelMetadataRequest{Name: model})
	cancel()
	if err != nil {
		fail("ModelMetadata", err)
	}
	raw := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	req := &inference.ModelInferRequest{
		ModelName:  model,
		Parameters: map[string]*inference.InferParameter{"routing_key": stringParam(routingKey)},
		Inputs: []*inference.ModelInferRequest_InferInputTensor{
			{Name: "input", Datatype: "FP32", Shape: []int64{1, int64(len(values))}},
		},
		RawInputContents: [][]byte{raw},
	}
	if requestID != "" {
		req.Parameters["request_id"] = stringParam(requestID)
	}
	if version != 0 {
		req.ModelVersion = strconv.Itoa(version)
	}
	ctx, cancel = call()
	resp, err := client.ModelInfer(ctx, req)
	cancel()
	if err != nil {
		fail("ModelInfer", err)
	}
	fields := map[string]interface{}{"model": resp.GetModelName(), "ready": ready.GetReady(),
		"versions": meta.GetVersions(), "width": meta.GetInputs()[0].GetShape()[1]}
	id := ""
	for i, o := range resp.GetOutputs() {
		b := resp.GetRawOutputContents()[i]
		switch o.GetName() {
		case "score":
			fields["score"] = float64(math.Float32frombits(binary.LittleEndian.Uint32(b)))
		case "version":
			fields["version"] = int32(binary.LittleEndian.Uint32(b))
		case "request_id":
			id = string(b[4 : 4+binary.LittleEndian.Uint32(b)])
			fields["request_id"] = id
		}
	}
	out.line("ModelInfer", fields)
	return id
}

type printer struct{ asJSON bool }

func (p printer) line(call string, fields map[string]interface{}) {
	if p.asJSON {
		fields["call"] = call
		b, _ := json.Marshal(fields)
		fmt.Println(string(b))
		return
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := []string{call}
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%v", k, fields[k]))
	}
	fmt.Println(strings.Join(parts, " "))
}

// fail prints the gRPC status of a failed call and exits 1.
func fail(call string, err error) {
	st, _ := status.FromError(err)
	fmt.Fprintf(os.Stderr, "%s failed: code=%s message=%q\n", call, st.Code(), st.Message())
	os.Exit(1)
}

func prediction(r *chimerav1.PredictResponse) map[string]interface{} {
	return map[string]interface{}{
		"request_id": r.GetRequestId(), "model": r.GetModel(), "version": r.GetVersion(), "score": r.GetScore(),
	}
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "gateway host:port")
	model := flag.String("model", "", "registered model name (required)")
	featuresFlag := flag.String("features", "", "named features, e.g. f0=0.1,f1=2 (required)")
	routingKey := flag.String("routing-key", "go-client", "sticky routing key")
	requestID := flag.String("request-id", "", "request id for Predict (empty: the gateway makes one)")
	version := flag.Int("version", 0, "pin a version (needs CHIMERA_ADMIN_TOKEN in the environment)")
	batch := flag.Int("batch", 3, "rows in the PredictBatch call (0: skip it)")
	outcome := flag.Float64("outcome", 1, "outcome value reported for the Predict request")
	skipOutcome := flag.Bool("no-outcome", false, "do not call RecordOutcome/RecordOutcomes")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline of each call")
	dialTimeout := flag.Duration("dial-timeout", 10*time.Second, "how long to wait for the connection")
	asJSON := flag.Bool("json", false, "print one JSON object per line")
	oip := flag.Bool("oip", false, "call the Open Inference Protocol's ModelInfer instead of Predict/PredictBatch")
	flag.Parse()

	if *model == "" {
		fmt.Fprintln(os.Stderr, "-model is required")
		os.Exit(2)
	}
	features, err := parseFeatures(*featuresFlag)
	if err != nil {
		fmt.Fprintln(os.Stderr, "-features:", err)
		os.Exit(2)
	}
	out := printer{asJSON: *asJSON}

	dialCtx, cancelDial := context.WithTimeout(context.Background(), *dialTimeout)
	defer cancelDial()
	// grpc-go 1.33 (Debian) has no credentials/insecure package: WithInsecure is the plaintext option.
	conn, err := grpc.DialContext(dialCtx, *target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", *target, err)
		os.Exit(1)
	}
	defer conn.Close()
	client := chimerav1.NewPredictionServiceClient(conn)

	// call returns a context with this call's deadline; pinned versions carry the admin token.
	call := func() (context.Context, context.CancelFunc) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		if *version != 0 {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+os.Getenv("CHIMERA_ADMIN_TOKEN"))
		}
		return ctx, cancel
	}

	if *oip {
		id := modelInfer(conn, call, *model, orderedValues(*featuresFlag), *routingKey, *requestID, *version, out)
		if !*skipOutcome {
			ctx, cancel := call()
			_, err = client.RecordOutcome(ctx, &chimerav1.RecordOutcomeRequest{RequestId: id, Value: *outcome})
			cancel()
			if err != nil {
				fail("RecordOutcome", err)
			}
			out.line("RecordOutcome", map[string]interface{}{"request_id": id, "value": *outcome, "status": "OK"})
		}
		return
	}

	ctx, cancel := call()
	resp, err := client.Predict(ctx, &chimerav1.PredictRequest{
		Model: *model, RoutingKey: *routingKey, RequestId: *requestID, Features: features,
		Version: int32(*version),
	})
	cancel()
	if err != nil {
		fail("Predict", err)
	}
	out.line("Predict", prediction(resp))

	var batchIDs []string
	if *batch > 0 {
		rows := make([]*chimerav1.PredictRequest, *batch)
		for i := range rows {
			rows[i] = &chimerav1.PredictRequest{
				RoutingKey: fmt.Sprintf("%s-%d", *routingKey, i), Features: features, Version: int32(*version),
			}
		}
		ctx, cancel := call()
		bresp, err := client.PredictBatch(ctx, &chimerav1.PredictBatchRequest{Model: *model, Rows: rows})
		cancel()
		if err != nil {
			fail("PredictBatch", err)
		}
		for i, r := range bresp.GetResults() {
			fields := prediction(r)
			fields["row"] = i
			out.line("PredictBatch", fields)
			batchIDs = append(batchIDs, r.GetRequestId())
		}
	}

	if *skipOutcome {
		return
	}
	ctx, cancel = call()
	_, err = client.RecordOutcome(ctx, &chimerav1.RecordOutcomeRequest{RequestId: resp.GetRequestId(), Value: *outcome})
	cancel()
	if err != nil {
		fail("RecordOutcome", err)
	}
	out.line("RecordOutcome", map[string]interface{}{"request_id": resp.GetRequestId(), "value": *outcome, "status": "OK"})

	if len(batchIDs) > 0 {
		req := &chimerav1.RecordOutcomesRequest{}
		for _, id := range batchIDs {
			req.Outcomes = append(req.Outcomes, &chimerav1.RecordOutcomeRequest{RequestId: id, Value: *outcome})
		}
		ctx, cancel := call()
		oresp, err := client.RecordOutcomes(ctx, req)
		cancel()
		if err != nil {
			fail("RecordOutcomes", err)
		}
		for i, s := range oresp.GetStatuses() {
			out.line("RecordOutcomes", map[string]interface{}{
				"request_id": batchIDs[i], "code": s.GetCode(), "message": s.GetMessage(),
			})
		}
	}
}
