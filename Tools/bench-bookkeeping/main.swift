// ferry-bench-bookkeeping: what page bookkeeping costs under write load.
//
// Pre-copy under writes marks pages sent, dirty, requested and received all
// the time, on the seeder and the leecher alike (one `PageStore` type), and
// ships the dirty set in every Sync and Finalize reply. This benchmark marks
// 250,000 scattered pages of a 1 GiB store the way a write-heavy migration
// does, and encodes and decodes that dirty set, against a same-run baseline:
// writing one byte per page into a plain 262,144-byte array at the same
// scattered indices (the least any per-page bookkeeping can cost).
//
// Target (issue 10): marking 250k scattered pages of a 1 GiB store takes
// <= 5 ms. Before the fix, each dirty range copied the segment's state
// arrays (copy-on-write through a second reference): seconds per mark.
//
//   swift run -c release ferry-bench-bookkeeping [--runs N]
import Foundation
import FerryMigration

let runs: Int = {
    let arguments = CommandLine.arguments
    if let i = arguments.firstIndex(of: "--runs"), i + 1 < arguments.count, let n = Int(arguments[i + 1]), n > 0 { return n }
    if arguments.count > 1 {
        FileHandle.standardError.write("usage: ferry-bench-bookkeeping [--runs N]\n".data(using: .utf8)!)
        exit(2)
    }
    return 7
}()

let base: UInt64 = 0x7f00_0000_0000
let oneGiBPages = 262_144
let layout = [Region(range: AddressRange(start: base, end: base + UInt64(oneGiBPages) * pageSize),
                     permissions: "rw-p", offset: 0, device: "00:00", inode: 0, name: "", kind: .migrate)]
var generator = SystemRandomNumberGenerator()
// 250k distinct scattered pages, in a random order (as dirty reports from
// several threads arrive) and, separately, in address order (as a decoded
// report is).
let indices = Array((0..<oneGiBPages).shuffled(using: &generator).prefix(250_000))
let scattered = indices.map { AddressRange(start: base + UInt64($0) * pageSize, end: base + UInt64($0 + 1) * pageSize) }
let sorted = scattered.sorted { $0.start < $1.start }
let coalesced: [AddressRange] = sorted.reduce(into: []) { out, range in
    if let last = out.last, last.end == range.start { out[out.count - 1].end = range.end } else { out.append(range) }
}

func milliseconds(_ body: () throws -> Void) rethrows -> Double {
    let start = ContinuousClock.now
    try body()
    let d = ContinuousClock.now - start
    return (Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18) * 1000
}

func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

var baseline: [Double] = []
var markDirty: [Double] = []
var markCycle: [Double] = []
var encode: [Double] = []
var decode: [Double] = []
var reportBytes = 0
var sink = 0
for _ in 0..<runs {
    var plain = [UInt8](repeating: 0, count: oneGiBPages)
    baseline.append(milliseconds {
        for i in indices { plain[i] &+= 1 }
    })
    sink &+= Int(plain[indices[0]])

    var store = PageStore(layout: layout)
    store.markSent(layout.map(\.range))
    // The leecher's and the seeder's mark of a dirty report: clean -> dirty.
    markDirty.append(milliseconds { store.markDirty(scattered) })
    // A re-send round of the same pages: requested, arrived, sent again.
    markCycle.append(milliseconds {
        store.markRequested(scattered)
        store.markArrived(scattered)
        store.markSent(scattered)
    })
    sink &+= store.count(.clean)

    var parts: [[UInt8]] = []
    encode.append(milliseconds {
        parts = DirtyReportCodec.parts(epoch: 1, layout: nil, dirty: coalesced, rate: 0, freeze: 0)
    })
    reportBytes = parts.reduce(0) { $0 + $1.count }
    decode.append(try milliseconds {
        sink &+= try DirtyReportCodec.decode(parts).dirty.count
    })
}

let floor = median(baseline)
func row(_ name: String, _ values: [Double]) {
    let padded = name.padding(toLength: 46, withPad: " ", startingAt: 0)
    print(padded + String(format: " %8.2f ms  (%6.1fx the baseline)  runs: ", median(values), median(values) / floor)
          + values.map { String(format: "%.2f", $0) }.joined(separator: " "))
}
print("ferry-bench-bookkeeping: 250,000 scattered pages of a 1 GiB store, median of \(runs) runs")
row("baseline: one byte per page in a plain array", baseline)
row("PageStore.markDirty (clean -> dirty)", markDirty)
row("PageStore requested + arrived + sent", markCycle)
row("dirty report encode (\(coalesced.count) ranges)", encode)
row("dirty report decode", decode)
print(String(format: "  dirty report on the wire: %d bytes (%.1f bytes a page; a range list would take %d)",
             reportBytes, Double(reportBytes) / 250_000, coalesced.count * 12))
let met = median(markDirty) <= 5
print("target: marking 250k scattered pages of a 1 GiB store <= 5 ms: \(met ? "MET" : "MISSED") (\(String(format: "%.2f", median(markDirty))) ms)")
if sink == 42 { print("") }
