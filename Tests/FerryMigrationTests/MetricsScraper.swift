// Scrapes a `--metrics` endpoint the way Prometheus would, and parses the
// answer with a real Prometheus client library: Debian's
// python3-prometheus-client (`prometheus_client.parser`), run by Debian's
// own python3 (Tools/test.sh installs both).
import Foundation
import FerryTestSupport
import Testing

/// One parsed scrape.
struct Scrape {
    /// The Content-Type the server answered with.
    var contentType: String
    /// Family name (as the parser names it: counters without `_total`) to type.
    var families: [String: String]
    /// Sample name plus its labels other than `role`, sorted, e.g.
    /// `ferry_migrations{phase=tracking}`, to value (nil for NaN).
    var samples: [String: Double?]
    /// The `role` labels seen.
    var roles: [String]

    func value(_ key: String) throws -> Double {
        guard let entry = samples[key] else { throw TestFailure("no sample \(key) in the scrape") }
        guard let value = entry else { throw TestFailure("\(key) is NaN") }
        return value
    }

    init(json: Any) throws {
        guard let object = json as? [String: Any], let families = object["families"] as? [String: String],
              let samples = object["samples"] as? [String: Any], let roles = object["roles"] as? [String] else {
            throw TestFailure("the scraper's output is not a scrape: \(json)")
        }
        contentType = object["type"] as? String ?? ""
        self.families = families
        self.samples = samples.mapValues { $0 as? Double }
        self.roles = roles
    }
}

enum MetricsScraper {
    static let python = "/usr/bin/python3"

    /// True when Debian's python3 has prometheus_client; tests that need it
    /// are skipped with that reason otherwise.
    static let available: Bool = {
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: python)
        probe.arguments = ["-c", "import prometheus_client.parser"]
        probe.standardError = FileHandle.nullDevice
        guard (try? probe.run()) != nil else { return false }
        probe.waitUntilExit()
        return probe.terminationStatus == 0
    }()

    static let unavailableReason: Comment = "needs /usr/bin/python3 with python3-prometheus-client (apt-get install python3-prometheus-client; Tools/test.sh does)"

    /// `once URL`: one scrape, printed as a JSON line. `watch URL FILE`:
    /// scrapes every 20 ms until the endpoint goes away, then writes every
    /// scrape to FILE as a JSON array and prints "done".
    static let script = #"""
import json, math, sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families

def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        ctype = answer.headers.get("Content-Type")
        text = answer.read().decode("utf-8")
    families, samples, roles = {}, {}, set()
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for s in family.samples:
            roles.add(s.labels.get("role"))
            labels = ",".join("%s=%s" % (k, s.labels[k]) for k in sorted(s.labels) if k != "role")
            key = s.name + ("{%s}" % labels if labels else "")
            samples[key] = None if math.isnan(s.value) else s.value
    return {"type": ctype, "families": families, "samples": samples, "roles": sorted(r or "" for r in roles)}

mode, url = sys.argv[1], sys.argv[2]
if mode == "once":
    print(json.dumps(scrape(url)), flush=True)
else:
    scrapes = []
    while True:
        try:
            scrapes.append(scrape(url))
        except Exception as e:
            break
        time.sleep(0.02)
    with open(sys.argv[3], "w") as out:
        json.dump(scrapes, out)
    print("done %d" % len(scrapes), flush=True)
"""#

    /// One scrape of `url`, parsed by prometheus_client.
    static func once(_ url: String) throws -> Scrape {
        let child = try ChildProcess(python, ["-c", script, "once", url])
        defer { child.stop() }
        let line = try child.readLine(timeout: 20)
        return try Scrape(json: try JSONSerialization.jsonObject(with: Data(line.utf8)))
    }

    /// Starts scraping `url` every 20 ms until it goes away; `finish` waits
    /// for that and returns the scrapes in order.
    static func watch(_ url: String) throws -> Watcher {
        let file = "/tmp/ferry-metrics-watch-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
        return Watcher(child: try ChildProcess(python, ["-c", script, "watch", url, file]), file: file)
    }

    struct Watcher {
        let child: ChildProcess
        let file: String

        func finish(timeout: Double = 60) throws -> [Scrape] {
            defer { try? FileManager.default.removeItem(atPath: file) }
            _ = try child.expect("done", timeout: timeout)
            let data = try Data(contentsOf: URL(fileURLWithPath: file))
            guard let list = try JSONSerialization.jsonObject(with: data) as? [Any] else {
                throw TestFailure("the watcher wrote no list")
            }
            return try list.map { try Scrape(json: $0) }
        }
    }
}
