package dev.keystone.bench.flinkos;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.time.Duration;
import java.util.HashMap;
import java.util.Iterator;
import java.util.Map;
import java.util.TreeMap;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.functions.RichFlatMapFunction;
import org.apache.flink.api.common.serialization.SimpleStringSchema;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.base.DeliveryGuarantee;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.connector.opensearch.sink.BulkResponseInspector;
import org.apache.flink.connector.opensearch.sink.Opensearch2Sink;
import org.apache.flink.connector.opensearch.sink.Opensearch2SinkBuilder;
import org.apache.flink.connector.opensearch.sink.OpensearchEmitter;
import org.apache.flink.connector.opensearch.sink.RequestIndexer;
import org.apache.flink.streaming.api.CheckpointingMode;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;
import org.apache.http.HttpHost;
import org.opensearch.action.DocWriteRequest;
import org.opensearch.action.bulk.BulkItemResponse;
import org.opensearch.action.bulk.BulkRequest;
import org.opensearch.action.bulk.BulkResponse;
import org.opensearch.action.index.IndexRequest;
import org.opensearch.common.xcontent.XContentType;
import org.opensearch.core.rest.RestStatus;
import org.opensearch.index.VersionType;

/**
 * S9's Flink peer: the CDC topic (keyed by order_id) -> dedup by (order_id, event_id)
 * within 10 min of event time (the S2 operator of peers/flink) -> per-order reorder by
 * seq, contiguous, max delay 2 s (the S3 operator) -> projection -> the Flink
 * OpenSearch sink (flink-connector-opensearch2): document id = order_id, external
 * version = seq, 1,000 actions or 5 MB per bulk request, flushed on every checkpoint
 * (AT_LEAST_ONCE delivery guarantee), checkpoints every 1 s. A version conflict (409:
 * the index already holds this or a newer version) is a success, as in Keystone's
 * sink; any other refused item fails the job.
 *
 * <p>Flink 1.19: no OpenSearch connector is published for Flink 2.x (see pom.xml). The
 * dedup and reorder operators are copies of peers/flink's BenchJob.Dedup and
 * BenchJob.Reorder (that module builds against Flink 2.3). Runs until stopped: the
 * harness stops it once the index holds every order's last version.
 */
public final class S9Job {
  private S9Job() {}

  static final ObjectMapper MAPPER = new ObjectMapper();

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    int parallelism = Integer.parseInt(opts.getOrDefault("parallelism", "1"));
    long windowMs = Long.parseLong(opts.getOrDefault("window-ms", "600000"));
    long maxDelayMs = Long.parseLong(opts.getOrDefault("max-delay-ms", "2000"));
    int bulkActions = Integer.parseInt(opts.getOrDefault("bulk-size", "1000"));
    String index = opts.get("index");
    java.net.URI endpoint = java.net.URI.create(opts.get("endpoint"));

    Configuration conf = new Configuration();
    conf.setString("state.backend.type", "hashmap");
    conf.setString("pipeline.object-reuse", "true");
    conf.setString("rest.bind-port", "0");
    // A failure ends the run (and shows) instead of restarting silently.
    conf.setString("restart-strategy.type", "none");
    conf.setString("state.checkpoint-storage", "filesystem");
    conf.setString("state.checkpoints.dir", "file://" + opts.get("checkpoint-dir"));
    StreamExecutionEnvironment env = StreamExecutionEnvironment.createLocalEnvironment(parallelism, conf);
    env.getConfig().enableObjectReuse();
    env.setParallelism(parallelism);
    env.enableCheckpointing(
        Long.parseLong(opts.getOrDefault("checkpoint-ms", "1000")), CheckpointingMode.AT_LEAST_ONCE);

    KafkaSource<String> source =
        KafkaSource.<String>builder()
            .setBootstrapServers(opts.get("bootstrap"))
            .setTopics(opts.get("in-topic"))
            .setGroupId(opts.get("group"))
            .setStartingOffsets(OffsetsInitializer.earliest())
            .setValueOnlyDeserializer(new SimpleStringSchema())
            .build();
    WatermarkStrategy<String> wm =
        WatermarkStrategy.<String>forBoundedOutOfOrderness(Duration.ZERO)
            .withTimestampAssigner((line, prev) -> TsExtract.ts(line));
    Opensearch2Sink<String> sink =
        new Opensearch2SinkBuilder<String>()
            .setHosts(new HttpHost(endpoint.getHost(), endpoint.getPort(), endpoint.getScheme()))
            .setEmitter(new ToIndexRequest(index))
            .setBulkFlushMaxActions(bulkActions)
            .setBulkFlushMaxSizeMb(5)
            .setDeliveryGuarantee(DeliveryGuarantee.AT_LEAST_ONCE)
            .setBulkResponseInspectorFactory(ctx -> new ConflictsAreApplied())
            .build();

    env.fromSource(source, wm, "cdc")
        .flatMap(new KeyTsExtract(true)).name("parse")
        .keyBy(t -> t.f0, Types.STRING)
        .process(new Dedup(windowMs)).name("dedup")
        .flatMap(new KeyTsExtract(false)).name("parse-order")
        .keyBy(t -> t.f0, Types.STRING)
        .process(new Reorder(maxDelayMs)).name("order")
        .flatMap(new Project()).name("project")
        .sinkTo(sink).name("search");
    env.execute("keystone-bench-s9");
  }

  /** Builds the index action: id = order_id, external version = seq, source = the document. */
  static final class ToIndexRequest implements OpensearchEmitter<String> {
    private final String index;

    ToIndexRequest(String index) {
      this.index = index;
    }

    @Override
    public void emit(String doc, SinkWriter.Context context, RequestIndexer indexer) {
      int at = doc.indexOf("\"seq\":") + 6;
      long seq = 0;
      while (at < doc.length() && Character.isDigit(doc.charAt(at))) {
        seq = seq * 10 + (doc.charAt(at) - '0');
        at++;
      }
      int idAt = doc.indexOf("\"order_id\":\"") + 12;
      String id = doc.substring(idAt, doc.indexOf('"', idAt));
      indexer.add(
          new IndexRequest(index)
              .id(id)
              .version(seq)
              .versionType(VersionType.EXTERNAL)
              .source(doc, XContentType.JSON));
    }
  }

  /** Fails on any refused item except a version conflict (the index holds this or a newer version). */
  static final class ConflictsAreApplied implements BulkResponseInspector {
    @Override
    public void inspect(BulkRequest request, BulkResponse response) {
      if (!response.hasFailures()) {
        return;
      }
      for (BulkItemResponse item : response.getItems()) {
        if (item.isFailed() && item.getFailure().getStatus() != RestStatus.CONFLICT) {
          DocWriteRequest<?> r = request.requests().get(item.getItemId());
          throw new IllegalStateException(
              "document " + r.id() + " refused: " + item.getFailureMessage());
        }
      }
    }
  }

  /** The document: order_id, seq, op and the after image's status, amount, customer_id. */
  static final class Project extends RichFlatMapFunction<String, String> {
    @Override
    public void flatMap(String line, Collector<String> out) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      JsonNode after = ev.path("after");
      ObjectNode o = MAPPER.createObjectNode();
      o.set("order_id", ev.get("order_id"));
      o.set("seq", ev.get("seq"));
      o.set("op", ev.get("op"));
      o.set("status", after.get("status"));
      o.set("amount", after.get("amount"));
      o.set("customer_id", after.get("customer_id"));
      out.collect(MAPPER.writeValueAsString(o));
    }
  }

  /** Reads `ts` (epoch ms) for the watermark assigner without building a tree. */
  static final class TsExtract {
    static long ts(String line) {
      int at = line.indexOf("\"ts\":");
      if (at < 0) {
        return Long.MIN_VALUE;
      }
      int i = at + 5;
      long v = 0;
      while (i < line.length() && Character.isDigit(line.charAt(i))) {
        v = v * 10 + (line.charAt(i) - '0');
        i++;
      }
      return v;
    }
  }

  /**
   * Parses the event: (order_id + "/" + event_id, ts, line) for the dedup, or (order_id,
   * seq, line) for the reorder.
   */
  static final class KeyTsExtract extends RichFlatMapFunction<String, Tuple3<String, Long, String>> {
    private final boolean dedupKey;
    private transient Tuple3<String, Long, String> reuse;

    KeyTsExtract(boolean dedupKey) {
      this.dedupKey = dedupKey;
    }

    @Override
    public void open(OpenContext ctx) {
      reuse = new Tuple3<>();
    }

    @Override
    public void flatMap(String line, Collector<Tuple3<String, Long, String>> out) throws Exception {
      JsonNode ev = MAPPER.readTree(line);
      String order = ev.get("order_id").asText();
      if (dedupKey) {
        reuse.f0 = order + "/" + ev.get("event_id").asText();
        reuse.f1 = ev.get("ts").asLong();
      } else {
        reuse.f0 = order;
        reuse.f1 = ev.get("seq").asLong();
      }
      reuse.f2 = line;
      out.collect(reuse);
    }
  }

  /** peers/flink BenchJob.Dedup (S2): first per key passes; forgotten after the window. */
  static final class Dedup extends KeyedProcessFunction<String, Tuple3<String, Long, String>, String> {
    private final long windowMs;
    private transient ValueState<Long> firstSeen;

    Dedup(long windowMs) {
      this.windowMs = windowMs;
    }

    @Override
    public void open(OpenContext ctx) {
      firstSeen = getRuntimeContext().getState(new ValueStateDescriptor<>("first-seen", Types.LONG));
    }

    @Override
    public void processElement(Tuple3<String, Long, String> ev, Context ctx, Collector<String> out)
        throws Exception {
      Long t0 = firstSeen.value();
      long ts = ev.f1;
      if (t0 != null && ts < t0 + windowMs) {
        return;
      }
      firstSeen.update(ts);
      ctx.timerService().registerEventTimeTimer(ts + windowMs);
      out.collect(ev.f2);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<String> out) throws Exception {
      Long t0 = firstSeen.value();
      if (t0 != null && t0 + windowMs <= timestamp) {
        firstSeen.clear();
      }
    }
  }

  /** peers/flink BenchJob.Reorder (S3): per key ascending by seq, contiguous, max delay. */
  static final class Reorder extends KeyedProcessFunction<String, Tuple3<String, Long, String>, String> {
    private static final long FLUSH_AT_END = Long.MAX_VALUE - 1;
    private final long maxDelayMs;
    private transient ValueState<Long> last;
    /** seq -> arrival ms + "\n" + line. */
    private transient MapState<Long, String> pending;

    Reorder(long maxDelayMs) {
      this.maxDelayMs = maxDelayMs;
    }

    @Override
    public void open(OpenContext ctx) {
      last = getRuntimeContext().getState(new ValueStateDescriptor<>("last", Types.LONG));
      pending = getRuntimeContext().getMapState(new MapStateDescriptor<>("pending", Types.LONG, Types.STRING));
    }

    @Override
    public void processElement(Tuple3<String, Long, String> ev, Context ctx, Collector<String> out)
        throws Exception {
      long seq = ev.f1;
      Long lastSeq = last.value();
      if (lastSeq != null && seq <= lastSeq) {
        return;
      }
      if (pending.contains(seq)) {
        return;
      }
      if (seq == (lastSeq == null ? 1 : lastSeq + 1)) {
        out.collect(ev.f2);
        last.update(seq);
        releaseRun(seq, out);
        return;
      }
      long now = ctx.timerService().currentProcessingTime();
      pending.put(seq, now + "\n" + ev.f2);
      ctx.timerService().registerProcessingTimeTimer(now + maxDelayMs);
      ctx.timerService().registerEventTimeTimer(FLUSH_AT_END);
    }

    private void releaseRun(long from, Collector<String> out) throws Exception {
      long next = from + 1;
      String p;
      while ((p = pending.get(next)) != null) {
        out.collect(p.substring(p.indexOf('\n') + 1));
        pending.remove(next);
        last.update(next);
        next++;
      }
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<String> out) throws Exception {
      TreeMap<Long, String> waiting = new TreeMap<>();
      for (Map.Entry<Long, String> e : pending.entries()) {
        waiting.put(e.getKey(), e.getValue());
      }
      if (waiting.isEmpty()) {
        return;
      }
      long upto;
      if (timestamp == FLUSH_AT_END) {
        upto = Long.MAX_VALUE;
      } else {
        upto = Long.MIN_VALUE;
        for (Map.Entry<Long, String> e : waiting.entrySet()) {
          String v = e.getValue();
          long arrived = Long.parseLong(v.substring(0, v.indexOf('\n')));
          if (arrived + maxDelayMs <= timestamp) {
            upto = Math.max(upto, e.getKey());
          }
        }
        if (upto == Long.MIN_VALUE) {
          return;
        }
      }
      long lastOut = Long.MIN_VALUE;
      Iterator<Map.Entry<Long, String>> it = waiting.entrySet().iterator();
      while (it.hasNext()) {
        Map.Entry<Long, String> e = it.next();
        if (e.getKey() > upto) {
          break;
        }
        String v = e.getValue();
        out.collect(v.substring(v.indexOf('\n') + 1));
        pending.remove(e.getKey());
        lastOut = e.getKey();
      }
      last.update(lastOut);
      releaseRun(lastOut, out);
    }
  }
}
