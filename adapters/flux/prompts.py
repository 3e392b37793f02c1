"""The flux adapter's built-in calibration prompts: varied subjects, styles and compositions, written for this
project.  ``--dataset`` replaces them with the texts of a file (one prompt per line), read by the core."""

DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow at dawn, soft golden light", "a bowl of ramen with a soft boiled egg, top view, studio lighting",
    "an old lighthouse on a rocky coast during a storm, dramatic waves", "a watercolor painting of a quiet canal in a european town",
    "a close-up portrait of an elderly fisherman with a knitted hat", "a futuristic city skyline at night with neon signs and flying cars",
    "a child flying a yellow kite on a windy green hill", "a still life of lemons and a glass jug on a wooden table, oil painting",
    "a snowy mountain range reflected in a calm alpine lake", "a cozy reading nook with a armchair, a lamp and stacks of books",
    "an astronaut riding a horse across a desert, cinematic", "a macro photo of a dragonfly on a blade of grass with dew drops",
    "a pencil sketch of a cathedral facade with intricate details", "a busy street market in the rain, umbrellas and lanterns",
    "a minimalist poster of a sailing boat, flat colors, geometric shapes", "a steaming cup of coffee next to an open notebook, morning light",
    "a herd of elephants walking across the savanna at sunset", "a medieval knight in shining armor holding a banner",
    "a bright living room with large windows and indoor plants", "a pixel art scene of a castle on a floating island",
    "a hummingbird drinking nectar from a purple flower", "a vintage red bicycle leaning against a brick wall",
    "an underwater coral reef with colorful fish and sun rays", "a bowl of fresh fruit painted in the style of impressionism",
    "a wooden cabin in a pine forest covered with snow, smoke from the chimney", "a robot chef cooking pancakes in a small kitchen",
    "a black and white photograph of a jazz musician playing saxophone", "a field of sunflowers under a clear blue sky",
    "a dragon made of paper origami on a white background", "a night sky full of stars above a desert campsite",
    "a sign that says 'open late' above a small bakery door", "a tabby cat sleeping on a windowsill in the afternoon sun",
    "an ancient stone bridge over a misty river in autumn", "a plate of sushi arranged on a black slate, food photography",
    "a girl reading a book under a large oak tree, anime style", "a vintage car driving along a coastal road, summer",
    "a detailed map of a fantasy kingdom drawn on parchment", "a glass terrarium with moss and tiny mushrooms",
    "a marathon runner crossing the finish line, crowd cheering", "a colorful hot air balloon festival over green valleys",
    "a library with tall wooden shelves and a spiral staircase", "a three dimensional render of a small isometric island with a windmill",
    "a portrait of a woman with freckles, natural light, 85mm lens", "a rainy window with city lights blurred in the background",
    "a bowl of soup on a checkered tablecloth, rustic kitchen", "a polar bear swimming in icy arctic water",
    "a street artist painting a mural of a giant whale", "a lantern-lit japanese garden with a wooden bridge and koi pond",
)
