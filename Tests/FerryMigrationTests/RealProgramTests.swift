// Programs nobody here wrote, migrated under write load: a Redis server fed
// by redis-benchmark, a Python interpreter churning a dictionary, and a
// Node.js (V8) program whose garbage collector maps, unmaps and protects
// its heap all the time, and a Java virtual machine with its GC and JIT
// threads. The image must equal the stopped process, region for region,
// byte for byte.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

private let redisServer = "/usr/bin/redis-server"
private let redisBenchmark = "/usr/bin/redis-benchmark"
private let python = "/usr/bin/python3"
private let node = "/usr/bin/node"
private let java = "/usr/bin/java", javac = "/usr/bin/javac"

@Suite(.serialized) struct RealProgramTests {
    /// Migrates `pid` (already running) through an in-process seeder and leecher, then compares.
    func migrateAndCompare(pid: Int32, name: String, tracker: TrackerKind? = nil) async throws {
        let process = try TrackedProcess.attach(pid: pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory(name)
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 5)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()
        #expect(summary.bytesReceived > 0)
        let report = try ImageVerifier.compare(directory: out, pid: pid)
        #expect(report.matches, "\(report)")
        #expect(report.regionsCompared > 3)
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: redisServer)
                   && FileManager.default.isExecutableFile(atPath: redisBenchmark),
                   "redis-server and redis-benchmark are not installed (apt-get install redis-server; Tools/test.sh does)"))
    func redisUnderRedisBenchmark() async throws {
        let port = 20000 + Int(getpid() % 20000)
        let server = try ChildProcess(redisServer, ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "",
                                                    "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"])
        defer { server.stop() }
        _ = try server.expect("", timeout: 5)
        // Wait until it accepts connections.
        var ready = false
        for _ in 0..<100 where !ready {
            let probe = try ChildProcess("/usr/bin/redis-cli", ["-p", "\(port)", "ping"])
            ready = (try? probe.readLine(timeout: 1)) == "PONG"
            probe.stop()
            if !ready { usleep(50_000) }
        }
        #expect(ready, "redis-server did not answer on port \(port)")
        let load = try ChildProcess(redisBenchmark, ["-p", "\(port)", "-t", "set,lpush,incr", "-n", "100000000",
                                                     "-r", "200000", "-d", "256", "-c", "8", "-q"])
        defer { load.stop() }
        usleep(500_000)  // let it fill some memory first
        try await migrateAndCompare(pid: server.pid, name: "redis")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: python), "python3 is not installed"))
    func pythonInterpreterChurningADictionary() async throws {
        let script = """
            import random, sys, threading
            table = {}
            def churn(seed):
                r = random.Random(seed)
                while True:
                    k = r.randrange(200000)
                    table[k] = bytes(r.randrange(256) for _ in range(64))
                    if r.random() < 0.1:
                        table.pop(r.randrange(200000), None)
            for s in range(2):
                threading.Thread(target=churn, args=(s,), daemon=True).start()
            print("ready", flush=True)
            sys.stdin.read()
            """
        let interpreter = try ChildProcess(python, ["-c", script])
        defer { interpreter.stop() }
        _ = try interpreter.expect("ready", timeout: 10)
        usleep(300_000)
        try await migrateAndCompare(pid: interpreter.pid, name: "python")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: node), "node is not installed (apt-get install nodejs)"),
          arguments: [TrackerKind.async, .sync])
    func nodeGarbageCollectingUnderAllocationLoad(tracker: TrackerKind) async throws {
        // A map of objects and typed arrays rewritten without pause: the young
        // generation is collected many times a second, the old one now and
        // then, and V8 maps, unmaps and re-protects heap pages as it goes.
        let script = """
            const table = new Map();
            let n = 0;
            function churn() {
                for (let i = 0; i < 20000; i++) {
                    const k = (n * 7919 + i) % 100000;
                    table.set(k, { n: n, text: "value " + k + " " + n, data: new Float64Array(16).fill(n) });
                    if (i % 10 === 0) table.delete((k * 31) % 100000);
                }
                n++;
                setImmediate(churn);
            }
            churn();
            console.log("ready");
            process.stdin.resume();
            """
        let program = try ChildProcess(node, ["-e", script])
        defer { program.stop() }
        _ = try program.expect("ready", timeout: 10)
        usleep(500_000)
        try await migrateAndCompare(pid: program.pid, name: "node-\(tracker.rawValue)", tracker: tracker)
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: java) && FileManager.default.isExecutableFile(atPath: javac),
                   "java and javac are not installed (apt-get install openjdk-17-jdk-headless)"))
    func javaVirtualMachineChurningAHashMap() async throws {
        let source = """
            import java.util.*;
            public class Churn {
                public static void main(String[] args) throws Exception {
                    Map<Integer, long[]> table = new HashMap<>();
                    for (int t = 0; t < 2; t++) {
                        final int seed = t;
                        Thread thread = new Thread(() -> {
                            Random r = new Random(seed);
                            while (true) {
                                long[] value = new long[16];
                                Arrays.fill(value, r.nextLong());
                                synchronized (table) {
                                    table.put(r.nextInt(100000), value);
                                    if (r.nextInt(10) == 0) table.remove(r.nextInt(100000));
                                }
                            }
                        });
                        thread.setDaemon(true);
                        thread.start();
                    }
                    System.out.println("ready");
                    System.in.read();
                }
            }
            """
        let directory = scratchDirectory("java-src")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try source.write(toFile: directory + "/Churn.java", atomically: true, encoding: .utf8)
        let compiler = try ChildProcess(javac, ["-d", directory, directory + "/Churn.java"])
        #expect(compiler.waitForExit(timeout: 60) == 0, "javac failed")
        let vm = try ChildProcess(java, ["-Xmx128m", "-cp", directory, "Churn"])
        defer { vm.stop() }
        _ = try vm.expect("ready", timeout: 30)
        usleep(500_000)
        try await migrateAndCompare(pid: vm.pid, name: "java")
    }
}
