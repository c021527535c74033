// ferry-manual: man(1) pages for a command built with swift-argument-parser,
// from the description the command prints of itself:
//
//   leecher --experimental-dump-help | ferry-manual --output-directory man1 --source "Ferry 0.1.0"
//
// writes man1/leecher.1 and one page per subcommand (man1/leecher-pull.1,
// ...) and prints their paths. Tools/install.sh runs it for every command.
// The argument parser's own generate-manual plugin builds the whole package
// in release mode before it writes a page; this reads only the JSON, so the
// pages describe exactly the binaries being installed.
import Foundation

func usage(_ problem: String? = nil) -> Never {
    let text = """
        usage: ferry-manual [--output-directory DIR] [--source TEXT] [--date TEXT] [--related NAME]... [JSON-FILE]

        Reads a command's `--experimental-dump-help` JSON (from JSON-FILE, or standard
        input) and writes NAME.1 for the command and each subcommand into DIR
        (default: the current directory).
          --source TEXT   the page footer's source, e.g. "Ferry 0.1.0"
          --date TEXT     the page footer's date (default: none, so pages are reproducible)
          --related NAME  another command to list under SEE ALSO (repeatable)

        """
    if let problem {
        FileHandle.standardError.write(Data("ferry-manual: \(problem)\n\n\(text)".utf8))
        exit(64)
    }
    print(text, terminator: "")
    exit(0)
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("ferry-manual: \(message)\n".utf8))
    exit(1)
}

var settings = ManualSettings()
var outputDirectory = "."
var input: String?
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    switch argument {
    case "-h", "--help": usage()
    case "--output-directory", "--source", "--date", "--related":
        guard let value = arguments.popFirst() else { usage("\(argument) needs a value") }
        switch argument {
        case "--output-directory": outputDirectory = value
        case "--source": settings.source = value
        case "--date": settings.date = value
        default: settings.related.append(value)
        }
    default:
        if argument.hasPrefix("-") && argument != "-" { usage("unknown option \(argument)") }
        guard input == nil else { usage("one JSON file at a time; got \(input!) and \(argument)") }
        input = argument
    }
}

let json: Data
if let input, input != "-" {
    guard let data = FileManager.default.contents(atPath: input) else { fail("cannot read \(input)") }
    json = data
} else {
    json = FileHandle.standardInput.readDataToEndOfFile()
}
let tool: ToolInfo
do {
    tool = try JSONDecoder().decode(ToolInfo.self, from: json)
} catch {
    fail("the input is not a command's --experimental-dump-help JSON: \(error)")
}
guard tool.serializationVersion == 0 else {
    fail("dump-help serialization version \(tool.serializationVersion) is not known (0 is); update Tools/manual")
}
do {
    try FileManager.default.createDirectory(atPath: outputDirectory, withIntermediateDirectories: true)
} catch {
    fail("cannot create \(outputDirectory): \(error.localizedDescription)")
}
for page in ManualPage.pages(of: tool.command, settings: settings) {
    let path = outputDirectory + "/" + page.name + "." + settings.section
    guard FileManager.default.createFile(atPath: path, contents: Data(page.text.utf8)) else {
        fail("cannot write \(path)")
    }
    print(path)
}
