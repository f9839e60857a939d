"""A few kilobytes of original prose: the default corpus, so the text job runs offline.

Written for this project (no third-party text), plain ASCII, so the byte-level fallback
tokenizer and the GPT-2 tokenizer both read it the same way on every machine.
"""

SAMPLE_TEXT = """\
The harbour town woke before the sun. Fishermen carried their nets down the stone steps,
and the baker opened his shutters to let the smell of bread into the street. A cart rolled
past the fountain, its wheels loud on the cobbles, and a dog followed it as far as the bridge
before turning back to sleep in a doorway.

On the hill above the town stood a workshop where three clockmakers worked side by side. The
oldest of them, a patient woman named Ada, taught the others that a clock is not one machine
but many small ones that agree with each other. Each wheel turns at its own speed, she said,
and each wheel trusts the one beside it. If one of them slips, the whole clock is wrong, and
no single wheel can tell you why. You have to listen to all of them at once.

The youngest clockmaker, Tomas, did not believe her at first. He built a clock with one great
wheel that did all the work, and for a week it kept perfect time. Then the weather turned
cold, the great wheel shrank a little, and the clock fell behind by an hour a day. Ada did not
laugh at him. She opened the case, showed him where the metal had tightened, and asked him
what he would do differently. He thought about it for a long time. Then he said that he would
use many small wheels, so that when one of them changed, the others could carry the load.

In the spring the river rose and flooded the lower streets. The people of the town carried
sacks of sand from the beach and built a wall along the water. No one gave orders. Each
family filled the sacks nearest to their house and passed them along the line, and by evening
the wall was long enough to hold the river back. The baker fed everyone who worked, and the
fishermen lent their boats to carry the old and the sick up the hill.

When the water went down, the town counted what it had lost: a bridge, two barns, a field of
young wheat. It also counted what it had learned. A wall built by many hands can be built in
a day. A message passed along a line arrives faster than a man who runs the whole way, as long
as every hand in the line is ready. And a town that writes down what it did can do it again.

So the clockmakers wrote it down. They wrote how many sacks each family had filled, how long
the line had been, and where the water had first come over the bank. They wrote the numbers
in a book with a red cover and kept the book on a shelf in the workshop, between the spare
springs and the jars of oil. Every year, on the day the river had risen, someone took the book
down and read it aloud in the square.

Years later, Tomas had his own workshop across the river. He built clocks for the station, for
the school and for the church, and each of them was made of many small wheels. When travellers
asked him why his clocks were so steady, he told them about the cold week and the great wheel,
and about the wall of sand along the water. A good machine, he said, is like a good town. It
does not depend on one strong part. It depends on many ordinary parts that keep faith with
each other, and on someone who writes down what happened so that the next one is better.

The children of the town liked to visit his workshop after school. He let them turn the
wheels with their fingers and count the teeth. He showed them how a small wheel turning fast
could drive a large wheel turning slowly, and how the large wheel, in turn, could lift a weight
that no child could lift alone. They asked him where the strength came from. It comes from
the arrangement, he said. The wheels are not strong. The way they are put together is strong.

In the autumn, merchants came from the cities in the north with wagons of cloth and salt, and
the market filled the square from the fountain to the church steps. Prices were called out in
three languages. The clockmakers sold small clocks for travellers, with cases of brass and
glass, and the merchants carried them home over the mountains. Some of those clocks are still
running today in houses far from the sea, keeping time for people who have never seen the
harbour, the river or the red book on the shelf.

The last page of the red book was written by Ada herself, in a small and careful hand. It said
only this: measure twice, trust the numbers, share the load, and leave the work a little better
than you found it. Then she closed the book, put it back on the shelf, and went out to watch the
boats come in with the evening tide.
"""
